"""The frozen query and key maps: each head's q and k as linear maps of the residual stream.

In Gemma 3 (docs/gemma3.md) head h of layer L scores query position q against key position k as

    s = scaling · ⟨RoPE_q(norm_q(W_Q,h x̂_q)), RoPE_k(norm_k(W_K,g x̂_k))⟩,   x̂ = input_layernorm(r_L)

with g = h // (n_heads / n_kv) its KV head (GQA), ``scaling = query_pre_attn_scalar^-1/2`` and
no Q/K biases. With the RMS denominators frozen at their values on the prompt (the input
norm's, and QK-norm's per position and head), every step is linear, so

    q_vec = A_q(L, h, q) r_L[q],   A_q = RoPE_q · diag(s_qn[q, h] (1 + w_qn)) · W_Q,h · diag(s_in[q] (1 + w_in))

(``[head_dim, d_model]``), the same for keys, and ``s = scaling · q_vec · k_vec`` is a bilinear
form of the two residual streams. RoPE is ``x cos + rotate_half(x) sin`` with the (cos, sin)
the layer received on the prompt (:class:`cltrace.frozen.LayerCapture` ``rope``), so sliding
and global layers, and any RoPE scaling, are whatever the model used.

A score exists wherever the model's mask lets the query see the key: earlier keys, and in a
prompt with images (multimodal Gemma 3) also LATER keys among the soft tokens of the query's
own image, which attend both ways (:meth:`QKMaps.key_after_query_allowed`). The maps are the
same at text and image positions: a soft token's residual stream starts from the soft token
vector (the state's ``embed``) instead of a scaled token embedding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UsageError
from ..frozen.attention import entries, pattern_rows
from ..replacement.state import ReplacementState


def rotate_half_rows(M: Tensor) -> Tensor:
    """``rotate_half`` along the first dimension (head_dim) of ``M [hd, ...]``: (-x2, x1)."""
    half = M.shape[0] // 2
    return torch.cat([-M[half:], M[:half]])


class QKMaps:
    """Query and key maps of every layer of one prompt's replacement state."""

    def __init__(self, state: ReplacementState, parts):
        cfg = parts.config
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise UsageError("attention logit softcapping is set: scores would not be bilinear "
                             "(Gemma 3 has none)")
        self.state, self.parts = state, parts
        fz = state.frozen
        self.n_layers, self.n_heads, self.n_kv, self.head_dim = fz.n_layers, fz.n_heads, fz.n_kv, fz.head_dim
        self.rep = self.n_heads // self.n_kv
        self.scaling = float(cfg.query_pre_attn_scalar) ** -0.5
        self.eps = cfg.rms_norm_eps
        self.bidirectional = bool(getattr(cfg, "use_bidirectional_attention", False))  # every key
        self.dtype = fz.dtype
        for L, layer in enumerate(parts.layers):
            attn = layer.self_attn
            for name in ("q_proj", "k_proj"):
                w = getattr(getattr(attn, name, None), "weight", None)
                if w is None or w.is_meta or w.numel() == 0:
                    raise UsageError(f"layer {L}: the model's attention weights ({name}) are not "
                                     "loaded: QK attribution needs them (load the whole model)")
            if attn.q_proj.bias is not None or attn.k_proj.bias is not None:
                raise UsageError(f"layer {L}: Q/K biases (Gemma 3 has none): scores would not be bilinear")

    def key_after_query_allowed(self, query: int, key: int) -> bool:
        """Whether the mask lets ``query`` attend to a LATER ``key``: never in a causal model;
        in an image prompt only among the soft tokens of one image (Gemma 3's bidirectional
        image rule; text positions stay causal); everywhere in a bidirectional model."""
        if self.state.frozen.causal:
            return False
        if self.bidirectional:
            return True
        groups = self.state.image_groups  # [n_pos]: image of each soft token, -1 text
        if groups is None:
            return False
        g = int(groups[query])
        return g >= 0 and int(groups[key]) == g

    def check(self, layer: int, head: int, query: int, key: int) -> None:
        """A UsageError naming the bad value: layer, head or position out of range, or a key
        after the query that the mask hides from it (:meth:`key_after_query_allowed`)."""
        n_pos = self.state.n_pos
        if not 0 <= layer < self.n_layers:
            raise UsageError(f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}")
        if not 0 <= head < self.n_heads:
            raise UsageError(f"head {head} is out of range: layer {layer} has heads 0..{self.n_heads - 1}")
        for name, p in (("query", query), ("key", key)):
            if not 0 <= p < n_pos:
                raise UsageError(f"{name} position {p} is out of range: the prompt has positions 0..{n_pos - 1}")
        if key > query and not self.key_after_query_allowed(query, key):
            if self.state.image_groups is None:
                raise UsageError(f"key position {key} comes after query position {query}: "
                                 "a causal model's query attends only to earlier keys")
            raise UsageError(f"key position {key} comes after query position {query} and they are not "
                             "soft tokens of one image: only those attend both ways, text attends "
                             "only to earlier keys")

    def _map(self, layer: int, proj: str, norm: str, index: int, pos: int,
             resid: Optional[Tensor] = None) -> Tensor:
        """``[head_dim, d_model]``: RoPE · frozen QK-norm · the head's rows of ``proj`` · frozen
        input norm, at position ``pos`` (``index``: the query head, or the KV head)."""
        attn = self.parts.layers[layer].self_attn
        cap = self.state.capture.layers[layer]
        hd = self.head_dim
        W = getattr(attn, proj).weight.detach()[index * hd:(index + 1) * hd].to(self.dtype)  # [hd, d]
        k_in = self.state.frozen.layers[layer].k_in
        W = W * k_in.at(torch.tensor([pos], device=W.device))  # x̂ = r · s_in[pos] (1 + w_in)
        r = cap.resid_in[pos].to(self.dtype) if resid is None else resid
        pre = W @ r  # the head's pre-norm vector on the prompt [hd]
        s = torch.rsqrt(pre.pow(2).mean() + self.eps)  # QK-norm's frozen denominator
        gain = 1.0 + getattr(attn, norm).weight.detach().to(self.dtype)
        W = (s * gain)[:, None] * W
        cos, sin = (x[pos].to(self.dtype) for x in cap.rope)
        return cos[:, None] * W + sin[:, None] * rotate_half_rows(W)

    def query_map(self, layer: int, head: int, pos: int) -> Tensor:
        """``A_q [head_dim, d_model]``: head ``head``'s query at ``pos`` = A_q r_layer[pos]."""
        return self._map(layer, "q_proj", "q_norm", head, pos)

    def key_map(self, layer: int, head: int, pos: int) -> Tensor:
        """``A_k [head_dim, d_model]``: the key head ``head`` reads (its KV head) at ``pos``."""
        return self._map(layer, "k_proj", "k_norm", head // self.rep, pos)

    def resid(self, layer: int, pos: int) -> Tensor:
        """The residual stream r_layer[pos] the real model had: [d_model]."""
        return self.state.capture.layers[layer].resid_in[pos].to(self.dtype)

    def score(self, layer: int, head: int, query: int, key: int) -> float:
        """The pre-softmax score (scaled, unmasked) from the frozen maps and the real streams."""
        q = self.query_map(layer, head, query) @ self.resid(layer, query)
        k = self.key_map(layer, head, key) @ self.resid(layer, key)
        return float(self.scaling * (q @ k))

    def pattern(self, layer: int, head: int, queries: Optional[Tensor] = None) -> Tensor:
        """The attention probabilities of the head on the prompt at the rows ``queries``
        (default: all): ``[n_queries, n_pos (key)]``."""
        n = self.state.n_pos
        queries = torch.arange(n) if queries is None else torch.as_tensor(queries).reshape(-1)
        return pattern_rows(self.state.capture.layers[layer].pattern, head, queries.long())

    def prob(self, layer: int, head: int, query: int, key: int) -> float:
        """The attention probability of the head at (query, key)."""
        q, k = torch.tensor([query]), torch.tensor([key])
        return float(entries(self.state.capture.layers[layer].pattern, q, k)[0, head])
