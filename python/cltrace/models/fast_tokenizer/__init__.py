"""The optional fast path for the embedded model's tokenizer: the token ids and texts of the
tokenizers library, without its 1.3-1.6 s start-up (building the 514,906 BPE merges).

Optional: nothing but :func:`cltrace.models.load._cached_tokenizer` uses it, and whenever it
answers None the caller builds transformers' ``PreTrainedTokenizerFast`` on the same files
instead, with the same results. Two modules:

* :mod:`.compact` converts a tokenizer.json once into ``tokenizer.cltrace.bin`` beside it
  (vocabulary, merges, byte tokens, added tokens; memory-mapped on later starts, rebuilt when
  the tokenizer.json changes);
* :mod:`.tokenizer` encodes and decodes from that file (:class:`.tokenizer.FastPathTokenizer`).

**Where it is used.** Only for cltrace's own cached copy of the embedded Gemma 3 270M (a folder
with ``cltrace-cache.json``, ``tokenizer.json`` and a ``tokenizer_config.json`` without a chat
template whose backend is "tokenizers"). Hub ids, other local checkpoints and GGUF files get
``AutoTokenizer`` and never come here.

**Which tokenizer.json it supports.** Exactly the tokenizers pipeline Gemma 3 ships, checked
field by field (:func:`.compact._supported`, :func:`.compact._bos`):

* normalizer: Replace ' ' -> '▁'; pre-tokenizer: none, or a Split on ' ' (a no-op after it);
* model: BPE with ``byte_fallback``, without dropout, ``ignore_merges``, continuing-subword
  prefix or end-of-word suffix; the ids exactly 0..V-1; all 256 ``<0xXX>`` byte tokens present;
* added tokens: inside the model vocabulary, not normalized, no lstrip/rstrip/single_word;
  no token that the ByteFallback decoder would slice inside a character (6 bytes, ``<0x`` and
  ``>``, but a multi-byte character in the middle);
* post-processor: a TemplateProcessing that puts one special token (``<bos>``) before a single
  sequence;
* decoder: the Sequence Replace '▁' -> ' ', ByteFallback, Fuse; no truncation or padding.

Anything else makes :func:`fast_tokenizer` answer None (recorded in a header-only file, so the
tokenizer.json is not parsed again on every start), as does a folder that holds no up-to-date
compact file and cannot be written.

**Which calls it answers itself.** ``tokenizer(text or list of texts, add_special_tokens=,
return_tensors=None or "pt")`` (a batch only without tensors) and ``encode(text,
add_special_tokens=)``; ``decode``/``batch_decode`` of ids with ``skip_special_tokens`` and
``clean_up_tokenization_spaces`` None or False; ``convert_tokens_to_ids``,
``convert_ids_to_tokens`` (without ``skip_special_tokens``), ``len()``, the ``bos``, ``eos``,
``unk``, ``pad`` and ``mask`` tokens and their ids (from tokenizer_config.json), and
``chat_template`` (None).

**What goes to transformers.** Every other call or argument (``get_vocab``,
``save_pretrained``, ``apply_chat_template``, ``backend_tokenizer``, padding, truncation,
offsets, ...), setting any public attribute, and encoding once the Python BPE would cost more
than building the library tokenizer (one call over ``LONG_TEXT`` characters, or over ``BUDGET``
characters in all) are answered by the full ``PreTrainedTokenizerFast`` on the same files,
built on first need; once it exists every call goes to it. The object is not a subclass of
the transformers classes.
"""
from .tokenizer import fast_tokenizer

__all__ = ["fast_tokenizer"]
