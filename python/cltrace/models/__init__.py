"""Gemma 3 models: loading (embedded GGUF, hub ids, folders), the anatomy the replacement model
reads, batched MLP activations at the Gemma Scope 2 hook points, and the chat turn format;
multimodal checkpoints with images in the prompt (:mod:`.multimodal`).
The optional fast-path tokenizer of the embedded model is :mod:`.fast_tokenizer`."""
from .anatomy import TextParts, text_parts
from .chat import prompt_tokens
from .load import (DEFAULT_MODEL, LoadedModel, cache_root, embedded_model_dir, load_config,
                   load_model, load_tokenizer, resolve_device, resolve_dtype)
from .multimodal import ImagePrompt, LoadedMultimodal, check_multimodal, load_multimodal

__all__ = ["DEFAULT_MODEL", "ImagePrompt", "LoadedModel", "LoadedMultimodal", "TextParts",
           "cache_root", "check_multimodal", "embedded_model_dir", "load_config", "load_model",
           "load_multimodal", "load_tokenizer", "prompt_tokens", "resolve_device", "resolve_dtype",
           "text_parts"]
