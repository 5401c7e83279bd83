"""Tiny random Gemma 3 models and synthetic transcoder sets for fast tests.

The model is a real transformers ``Gemma3ForCausalLM`` (sliding and global layers, GQA, QK-norm,
tied unembedding) with random norm gains, so every frozen scale matters. With
``CLTRACE_TINY_MODEL=cltrace`` in the environment it is cltrace's own ``Gemma3ForCausalLM``
sharing those weights (what ``load_model`` returns), so the same suites run on either. Transcoder
thresholds are calibrated on the model's own MLP inputs so that a fair fraction of features is
active.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from cltrace.transcoders.base import LayerTranscoder, TranscoderSet


def tiny_gemma(n_layers: int = 4, n_kv: int = 2, dtype: torch.dtype = torch.float32,
               vocab: int = 300, window: int = 3, seed: int = 0):
    """A random Gemma3ForCausalLM: d_model 64, 4 heads of 16, ``n_kv`` KV heads, layer 2 global."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["full_attention" if L % 3 == 2 else "sliding_attention" for L in range(n_layers)]
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=n_kv, head_dim=16, sliding_window=window,
                           layer_types=types, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma3RMSNorm scales by (1 + w): make w matter
                p.normal_(0.0, 0.3)
            elif p.ndim == 2:
                p.normal_(0.0, 0.15 if "embed" in name else 1.0 / p.shape[1] ** 0.5)
    model = model.to(dtype).eval()
    if os.environ.get("CLTRACE_TINY_MODEL") == "cltrace":
        from cltrace.models.gemma3_load import from_transformers

        model = from_transformers(model, "tiny_gemma")
    return model


def random_transcoders(mlp_in: Tensor, kind: str = "plt", d_sae: int = 96, skip: bool = False,
                       active: float = 0.15, seed: int = 1, layers=None) -> TranscoderSet:
    """Random transcoders calibrated on ``mlp_in [n_layers, n_pos, d]`` (about ``active`` of
    the features active per position). ``kind`` "plt", or "clt" (layer S writes to S..n-1)."""
    n_layers, _, d = mlp_in.shape
    g = torch.Generator().manual_seed(seed)
    dtype = mlp_in.dtype
    out = {}
    for L in (range(n_layers) if layers is None else layers):
        W_enc = torch.randn(d, d_sae, generator=g, dtype=dtype) / d ** 0.5
        b_enc = 0.1 * torch.randn(d_sae, generator=g, dtype=dtype)
        z = mlp_in[L].cpu() @ W_enc + b_enc  # [n_pos, d_sae]
        threshold = torch.quantile(z.double(), 1.0 - active, dim=0).to(dtype).clamp_min(1e-3)
        n_out = 1 if kind == "plt" else n_layers - L
        W_dec = torch.randn(d_sae, n_out, d, generator=g, dtype=dtype) / d_sae ** 0.5
        b_dec = 0.1 * torch.randn(d, generator=g, dtype=dtype)
        W_skip = 0.1 * torch.randn(d, d, generator=g, dtype=dtype) / d ** 0.5 if skip else None
        out[L] = LayerTranscoder(W_enc, b_enc, threshold, W_dec, b_dec, W_skip)
    return TranscoderSet(kind=kind, n_layers=n_layers, layers=out, model_name="tiny-gemma-3")


def save_word_tokenizer(folder, words) -> None:
    """Save beside a tiny model a word-level tokenizer (<pad> 0, <eos> 1, <bos> 2, <unk> 3, then
    ``words``) that ``load_model(folder)`` reads back, so CLI tests can run on the saved model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{w: 4 + i for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


def tiny_model_and_set(n_rows: int, vocab: int, ctx: int, bos: int = 2):
    """(3-layer tiny Gemma, random token rows [n_rows, ctx] starting with ``bos``, a 40-wide PLT
    set fitted to the first 6 rows' MLP inputs): the inputs of the labelled-graph tests."""
    from cltrace.models.activations import ActivationSource

    torch.manual_seed(0)
    model = tiny_gemma(n_layers=3, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, vocab, (n_rows, ctx), generator=g)
    rows[:, 0] = bos
    x = ActivationSource(model, rows, [0, 1, 2], bos, outputs=False).read(torch.arange(6)).x
    return model, rows, random_transcoders(x, d_sae=40, active=0.08)
