"""One forward pass of a Gemma 3 model that records what the local replacement model freezes.

The local replacement model of Ameisen et al. (2025), "Circuit Tracing"
(https://transformer-circuits.pub/2025/attribution-graphs/methods.html#building-replacement-model)
freezes the attention patterns and every normalisation denominator at their values on the
prompt. This module runs the real model once (eager attention, so that the patterns exist)
with forward hooks and keeps, per layer L (Gemma 3 block, transformers ``modeling_gemma3``):

    a_L   = input_layernorm(r_L)                       scale_in[L]   = 1/rms(r_L)
    h_L   = r_L + post_attention_layernorm(attn(a_L))  scale_attn[L] = 1/rms(attn(a_L))
    x_L   = pre_feedforward_layernorm(h_L)             scale_pre[L]  = 1/rms(h_L)     (MLP input)
    m_L   = post_feedforward_layernorm(mlp(x_L))       scale_post[L] = 1/rms(mlp(x_L)) (MLP output)
    r_L+1 = h_L + m_L
    logits = norm(r_n) @ W_U^T                         scale_final   = 1/rms(r_n)

An RMSNorm here is ``y = x * scale * (1 + w)`` with ``scale = rsqrt(mean(x^2) + eps)`` in fp32;
the scales are stored in fp32 (fp64 for an fp64 model). The layer's rotary embedding (cos, sin) is
kept for the query and key maps of :mod:`cltrace.attention.maps`.

A prompt with images (a multimodal Gemma 3, :mod:`cltrace.models.vision`) is captured from its
input embeddings (the soft tokens in place) with its ``image_groups``: the model runs with the
bidirectional mask among one image's soft tokens, so its patterns have mass above the diagonal
there and are kept dense (the banded form holds causal bands only).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from .attention import BandedPattern, Pattern
from ..models.anatomy import TextParts, module_output


@dataclass(repr=False)
class LayerCapture:
    """What one decoder layer computed on the prompt (batch dimension dropped)."""

    resid_in: Tensor  # [n_pos, d_model]  r_L, the residual stream entering the layer
    attn_out: Tensor  # [n_pos, d_model]  attn(a_L), before post_attention_layernorm
    resid_mid: Tensor  # [n_pos, d_model]  h_L = r_L + post_attention_layernorm(attn_out)
    mlp_in: Tensor  # [n_pos, d_model]  x_L = pre_feedforward_layernorm(h_L)  (transcoder input)
    mlp_out: Tensor  # [n_pos, d_model]  m_L = post_feedforward_layernorm(mlp(x_L))  (target)
    pattern: Pattern  # [n_heads, n_pos, n_pos]  attention probabilities (query, key); banded
    #                   for a sliding-window layer longer than its window (:mod:`.attention`)
    scale_in: Tensor  # [n_pos] fp32  1/rms of r_L            (input_layernorm)
    scale_attn: Tensor  # [n_pos] fp32  1/rms of attn_out     (post_attention_layernorm)
    scale_pre: Tensor  # [n_pos] fp32  1/rms of h_L           (pre_feedforward_layernorm)
    scale_post: Tensor  # [n_pos] fp32  1/rms of mlp(x_L)     (post_feedforward_layernorm)
    rope: tuple[Tensor, Tensor]  # (cos, sin) [n_pos, head_dim]: the rotary embedding the layer's
    #                              attention applied to q and k (shared by layers of one type)


@dataclass(repr=False)
class Capture:
    """Everything recorded by :func:`capture` on one prompt."""

    tokens: Tensor  # [n_pos] int64
    embed: Tensor  # [n_pos, d_model]  token embeddings, already scaled by sqrt(d_model)
    layers: list[LayerCapture]  # n_layers
    resid_final: Tensor  # [n_pos, d_model]  input of the final norm
    scale_final: Tensor  # [n_pos] fp32  1/rms of resid_final
    logits: Tensor  # [n_pos, vocab]  the real model's logits (or [1, vocab]: the last only)
    image_groups: Optional[Tensor] = None  # [n_pos] int64: image of each soft token, -1 text;
    #                                        None: a text prompt (causal attention)

    @property
    def has_images(self) -> bool:
        return self.image_groups is not None and bool((self.image_groups >= 0).any())

    @property
    def n_pos(self) -> int:
        return self.tokens.numel()

    def __repr__(self) -> str:
        return (f"Capture(n_pos={self.n_pos}, n_layers={len(self.layers)}, "
                f"d_model={self.embed.shape[-1]}, dtype={self.embed.dtype})")


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last dimension, in fp32 as Gemma3RMSNorm does (in
    fp64 for an fp64 model, whose frozen model is then exact to fp64 rounding)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run with the eager attention implementation (the only one returning patterns)."""
    config = model.config
    previous = getattr(config, "_attn_implementation", None)
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous is not None:
            model.set_attn_implementation(previous)


@torch.no_grad()
def capture(parts: TextParts, tokens: Tensor, all_logits: bool = True, *,
            inputs_embeds: Optional[Tensor] = None, image_groups: Optional[Tensor] = None) -> Capture:
    """Run the model once on ``tokens [n_pos]`` and record the frozen quantities per layer
    (``all_logits=False``: the logits of the last position only, [1, vocab]). A prompt with
    images: ``inputs_embeds [n_pos, d_model]`` (the embeddings with the soft tokens in place,
    :meth:`cltrace.models.vision.VisionInput.embed`) and ``image_groups [n_pos]``."""
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    if inputs_embeds is not None and inputs_embeds.shape[0] != tokens.numel():
        raise ValueError(f"inputs_embeds has {inputs_embeds.shape[0]} positions, tokens {tokens.numel()}")
    images = image_groups is not None and bool((image_groups >= 0).any())
    eps = parts.config.rms_norm_eps
    rec: dict[tuple[str, int], Tensor] = {}
    handles = []

    def keep(name: str, idx: int, want_input: bool):
        def hook(_mod, args, out):
            rec[(name, idx)] = (module_output(args) if want_input else module_output(out))[0].detach()
            if name in ("ln_pre", "ln_post"):  # the MLP input and output, too
                rec[(name + "_out", idx)] = module_output(out)[0].detach()
        return hook

    def keep_rope(idx: int):
        def hook(_mod, args, kwargs):
            rope = args[1] if len(args) > 1 else kwargs.get("position_embeddings")
            if rope is None:  # cltrace's model passes it second, transformers' by keyword
                raise RuntimeError("the attention module received no rotary embedding (cos, sin)")
            rec[("rope", idx)] = tuple(x[0].detach() if x.dim() == 3 else x.detach() for x in rope)
        return hook

    def keep_pattern(idx: int):
        def hook(_mod, _args, out):
            if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                raise RuntimeError("the attention module returned no pattern; eager attention is needed")
            P = out[1][0].detach()  # [n_heads, n_pos, n_pos]
            window = getattr(parts.layers[idx].self_attn, "sliding_window", None)
            # a sliding-window layer keeps only its band (linear in n_pos, :class:`.attention.BandedPattern`)
            banded = window and not images and BandedPattern.saves_memory(P.shape[-1], window)
            rec[("pattern", idx)] = BandedPattern.from_dense(P, window) if banded else P
        return hook

    try:
        handles.append(parts.embed.register_forward_hook(keep("embed", 0, False)))
        for i, layer in enumerate(parts.layers):
            handles += [
                layer.input_layernorm.register_forward_hook(keep("ln_in", i, True)),
                layer.self_attn.register_forward_pre_hook(keep_rope(i), with_kwargs=True),
                layer.self_attn.register_forward_hook(keep_pattern(i)),
                layer.post_attention_layernorm.register_forward_hook(keep("ln_attn", i, True)),
                layer.pre_feedforward_layernorm.register_forward_hook(keep("ln_pre", i, True)),
                layer.post_feedforward_layernorm.register_forward_hook(keep("ln_post", i, True)),
            ]
        handles.append(parts.norm.register_forward_hook(keep("final", 0, True)))
        device = parts.lm_head.weight.device
        with eager_attention(parts.model):
            kw = {} if all_logits else {"logits_to_keep": 1}
            if inputs_embeds is None:
                kw["input_ids"] = tokens.to(device)[None]
            else:
                kw["inputs_embeds"] = inputs_embeds.to(device)[None]
                rec[("embed", 0)] = inputs_embeds.detach().to(device)
            if images:
                kw["image_groups"] = image_groups.to(device)[None]
            out = parts.model(use_cache=False, **kw)
    finally:
        for h in handles:
            h.remove()

    layers = []
    for i in range(parts.n_layers):
        r, h = rec[("ln_in", i)], rec[("ln_pre", i)]
        layers.append(LayerCapture(
            resid_in=r, attn_out=rec[("ln_attn", i)], resid_mid=h,
            mlp_in=rec[("ln_pre_out", i)], mlp_out=rec[("ln_post_out", i)],
            pattern=rec[("pattern", i)], rope=rec[("rope", i)],
            scale_in=rms_scale(r, eps), scale_attn=rms_scale(rec[("ln_attn", i)], eps),
            scale_pre=rms_scale(h, eps), scale_post=rms_scale(rec[("ln_post", i)], eps)))
    return Capture(tokens=tokens.detach().to(device), embed=rec[("embed", 0)], layers=layers,
                   resid_final=rec[("final", 0)], scale_final=rms_scale(rec[("final", 0)], eps),
                   logits=out.logits[0].detach(),
                   image_groups=image_groups.to(device) if images else None)
