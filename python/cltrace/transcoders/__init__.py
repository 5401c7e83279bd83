"""Transcoder sets: the shared in-memory form (:mod:`.base`) and the loaders of each layout."""
from .base import HOOK_IN, HOOK_OUT, LayerTranscoder, TranscoderSet

__all__ = ["HOOK_IN", "HOOK_OUT", "LayerTranscoder", "TranscoderSet"]
