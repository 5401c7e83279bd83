"""Transcoder sets: the shared in-memory form (:mod:`.base`) and the loaders of each layout.

:func:`load_transcoders` reads Gemma Scope 2 per-layer transcoders and CLTs and
circuit-tracer's native layouts, from a local folder or a Hugging Face reference, lazily
(memory-mapped) and with validation; see :mod:`.load`.
"""
from .base import HOOK_IN, HOOK_OUT, LayerTranscoder, TranscoderSet
from .checks import TranscoderLoadError
from .load import load_transcoders
from .safetensors_mmap import SafetensorsError, SafetensorsFile

__all__ = ["HOOK_IN", "HOOK_OUT", "LayerTranscoder", "SafetensorsError", "SafetensorsFile",
           "TranscoderLoadError", "TranscoderSet", "load_transcoders"]
