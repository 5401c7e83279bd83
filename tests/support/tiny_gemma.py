"""A tiny random Gemma 3 for fast tests, and what the tests build on it.

The model is a real transformers ``Gemma3ForCausalLM`` (sliding and global layers, GQA, QK-norm,
tied unembedding) with random norm gains, so every frozen scale matters. With
``CLTRACE_TINY_MODEL=cltrace`` in the environment it is cltrace's own ``Gemma3ForCausalLM``
sharing those weights (what ``load_model`` returns), so the same suites run on either.
Transcoder sets on it come from :func:`support.transcoders.random_transcoders`, calibrated on
the model's own MLP inputs so that a fair fraction of features is active.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .transcoders import random_transcoders

TOKENS = [2, 17, 201, 45, 99, 12, 250, 31]  # <bos> and 7 tokens: the prompt of the graph tests


def tiny_gemma(n_layers: int = 4, n_kv: int = 2, dtype: torch.dtype = torch.float32,
               vocab: int = 300, window: int = 3, seed: int = 0, rope_scaling: bool = False):
    """A random Gemma3ForCausalLM: d_model 64, 4 heads of 16, ``n_kv`` KV heads, layer 2 global
    (``rope_scaling``: its RoPE scaled linearly by 8, as in Gemma 3 4B and larger)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["full_attention" if L % 3 == 2 else "sliding_attention" for L in range(n_layers)]
    rope = {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
            } if rope_scaling else {}
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, **rope,
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


def exact_norms(model) -> None:
    """Make every RMSNorm of ``model`` compute in its input's dtype (Gemma3RMSNorm computes in
    fp32 whatever the dtype), so that an fp64 model is fp64 throughout and its frozen linear
    model is exact to fp64 rounding: identities can then be checked to 1e-9."""
    for m in model.modules():
        if type(m).__name__ == "Gemma3RMSNorm":
            m.forward = (lambda x, m=m: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
                         * (1.0 + m.weight))


def mlp_inputs(model, tokens) -> Tensor:
    """Each layer's MLP input on ``tokens`` (as the replacement model captures it):
    ``[n_layers, n_pos, d_model]``."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts

    cap = capture(text_parts(model), torch.as_tensor(tokens))
    return torch.stack([c.mlp_in for c in cap.layers])


def tiny_replacement(kind: str, dtype: torch.dtype = torch.float64, skip_positions: int = 0,
                     n_layers: int = 4, n_kv: int = 2, rope_scaling: bool = False):
    """A ReplacementModel on a tiny Gemma 3 (4 layers by default) and a 48-wide set calibrated
    on :data:`TOKENS`: ``kind`` "plt", "plt+skip", "clt" or "clt+skip"."""
    from cltrace.replacement import ReplacementModel

    torch.manual_seed(0)
    model = tiny_gemma(n_layers=n_layers, n_kv=n_kv, dtype=dtype, rope_scaling=rope_scaling)
    tcs = random_transcoders(kind[:3], mlp_in=mlp_inputs(model, TOKENS), skip=kind.endswith("skip"),
                             d_sae=48)
    return ReplacementModel(model, tcs, dtype=dtype, skip_positions=skip_positions)


def use_tiny_model(monkeypatch, rm) -> None:
    """Make the commands load ``rm``'s model (with a :class:`CharTokenizer`) and its
    transcoders as the starter set, whatever model they are asked for."""
    import cltrace.models
    import cltrace.training.starter

    loaded = cltrace.models.LoadedModel(rm.model, CharTokenizer(), "tiny")
    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: loaded)
    monkeypatch.setattr(cltrace.training.starter, "starter_transcoders", lambda *a, **k: rm.transcoders)


class CharTokenizer:
    """A stand-in tokenizer for the tiny model: <bos> (2) then one id per character."""

    bos_token_id, eos_token_id, pad_token_id = 2, 1, 0

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = ([2] if add_special_tokens else []) + [3 + ord(c) % 290 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + int(i) % 26) for i in ids)

    def batch_decode(self, seqs):
        return [self.decode(ids) for ids in seqs]

    def convert_tokens_to_ids(self, token):
        return 299


CAPITAL_WORDS = "the capital of france is paris".split()  # "<bos> the capital of france is": 2, 4 .. 8


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


def tiny_model_and_set(n_rows: int, vocab: int, ctx: int, bos: int = 2, boundaries=()):
    """(3-layer tiny Gemma, random token rows [n_rows, ctx] starting with ``bos``, a 40-wide PLT
    set fitted to the first 6 rows' MLP inputs): the inputs of the feature-page tests.
    ``boundaries``: (row, position) pairs set to ``bos`` too (documents inside a row)."""
    from cltrace.models.activations import ActivationSource

    torch.manual_seed(0)
    model = tiny_gemma(n_layers=3, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, vocab, (n_rows, ctx), generator=g)
    rows[:, 0] = bos
    for r, p in boundaries:
        rows[r, p] = bos
    x = ActivationSource(model, rows, [0, 1, 2], bos, outputs=False).read(torch.arange(6)).x
    return model, rows, random_transcoders(mlp_in=x, d_sae=40, active=0.08)
