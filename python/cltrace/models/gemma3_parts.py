"""Pieces of cltrace's Gemma 3 (:mod:`.gemma3`): RoPE per layer type, attention masks, GQA key
repetition and the KV cache used for generation.

RoPE (Su et al. 2021) rotates the pairs (i, i + head_dim/2) of q and k by ``pos * inv_freq[i]``
with ``inv_freq[i] = 1 / theta^(2i / head_dim)``; Gemma 3 uses theta 10k on sliding layers and
1M on global layers, and ``linear`` scaling (4B+) divides the global ``inv_freq`` by a factor.

Masks are indexed by position in the key/value sequence (past + current tokens, left padding
included): query ``q`` may attend key ``k`` when ``k <= q``, ``k`` is not padding and, on
sliding layers, ``k > q - sliding_window``. Images (multimodal checkpoints) add one rule, as
transformers' ``Gemma3Model`` does: the soft tokens of one image see each other both ways
(``group[q] == group[k] >= 0`` also allows ``k > q``), within the window on sliding layers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .gemma3_config import Gemma3TextConfig


class Rope(nn.Module):
    """cos/sin tables per layer type: ``(x, position_ids [B, T], type) -> cos, sin [B, T, hd]``
    in x's dtype (angles in fp32)."""

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        self.inv_freq: dict[str, Tensor] = {}  # plain fp32 tensors: never cast with the model
        hd = cfg.head_dim
        for t in sorted(set(cfg.layer_types)):
            p = cfg.rope_parameters[t]
            inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float, device="cpu") / hd))
            if p["rope_type"] == "linear":
                inv = inv / p["factor"]
            self.inv_freq[t] = inv  # [hd / 2]

    def forward(self, x: Tensor, position_ids: Tensor, layer_type: str) -> tuple[Tensor, Tensor]:
        inv = self.inv_freq[layer_type]
        if inv.device != x.device:
            inv = self.inv_freq[layer_type] = inv.to(x.device)
        freqs = position_ids[..., None].float() * inv  # [B, T, hd / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate ``q [B, H, T, hd]`` and ``k [B, H_kv, T, hd]`` by ``cos, sin [B, T, hd]``."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, H_kv, T, hd] -> [B, H_kv * n_rep, T, hd]``, each KV head repeated for its queries."""
    if n_rep == 1:
        return x
    B, H, T, hd = x.shape
    return x[:, :, None].expand(B, H, n_rep, T, hd).reshape(B, H * n_rep, T, hd)


class KVCache:
    """Keys and values of every layer for the tokens seen so far (``past_key_values``)."""

    def __init__(self, n_layers: int):
        self.keys: list[Optional[Tensor]] = [None] * n_layers  # [B, H_kv, T_seen, hd]
        self.values: list[Optional[Tensor]] = [None] * n_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's ``k, v [B, H_kv, T, hd]``; the whole sequence's come back."""
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def __len__(self) -> int:
        return sum(k is not None for k in self.keys)


def attention_masks(cfg: Gemma3TextConfig, x: Tensor, attention_mask: Optional[Tensor],
                    past: int, image_groups: Optional[Tensor] = None) -> dict[str, Optional[Tensor]]:
    """Per layer type the mask of queries ``past..past+T`` over keys ``0..past+T``.

    eager: additive float ``[B, 1, T, T_kv]`` (0 or the dtype's min), always; SDPA: boolean
    (True: attend), or None where SDPA's own causal mask is the same (no padding, and no key
    outside the window) -- the choices transformers makes, so the kernels see the same inputs.
    ``image_groups [B, T_kv]``: the image each position's soft token belongs to (0, 1, ...; -1
    for text); positions of one image attend each other both ways
    (sliding: ``window & (causal | same image)``, global: ``causal | same image``)."""
    B, T = x.shape[:2]
    n_kv = past + T
    if image_groups is not None:
        if image_groups.shape[-1] != n_kv:
            raise ValueError(f"image_groups covers {image_groups.shape[-1]} positions, "
                             f"expected past + current = {n_kv}")
        image_groups = image_groups.to(x.device)
        if not bool((image_groups >= 0).any()):
            image_groups = None  # no image: the text masks
    pad = None
    if attention_mask is not None:
        if attention_mask.shape[-1] != n_kv:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, "
                             f"expected past + current = {n_kv}")
        pad = attention_mask.to(device=x.device, dtype=torch.bool)  # [B, T_kv]
    no_pad = pad is None or bool(pad.all())
    eager = cfg._attn_implementation == "eager"
    out: dict[str, Optional[Tensor]] = {}
    for t in set(cfg.layer_types):
        window = cfg.sliding_window if t == "sliding_attention" else None
        if (not eager and no_pad and image_groups is None and (T == 1 or n_kv == T)
                and (window is None or n_kv < window)):
            out[t] = None
            continue
        q_pos = torch.arange(past, n_kv, device=x.device)[:, None]  # [T, 1]
        k_pos = torch.arange(n_kv, device=x.device)[None]  # [1, T_kv]
        m = (k_pos <= q_pos)[None, None]  # [1, 1, T, T_kv]
        if image_groups is not None:
            g_q, g_k = image_groups[:, None, past:, None], image_groups[:, None, None, :]
            m = m | ((g_q == g_k) & (g_q >= 0))  # [B, 1, T, T_kv]
        if window is not None:
            m = m & (k_pos > q_pos - window)
        m = m & pad[:, None, None, :] if pad is not None else m.expand(B, 1, T, n_kv)
        if eager:
            zero = torch.tensor(0.0, device=x.device, dtype=x.dtype)
            m = torch.where(m, zero, torch.finfo(x.dtype).min)
        out[t] = m
    return out
