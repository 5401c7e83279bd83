"""SAEs and crosscoders on the tiny model for the eval and feature-page tests, and plain hooks on
the transformers modules of each site (written out, not :func:`cltrace.models.sites.site_hooks`,
so that tests check the library against an independent reading of the sites)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .transcoders import random_transcoders


def site_hook(model, site: str, layer: int, fn: Callable[[Tensor], Optional[Tensor]]):
    """A hook on ``model`` (Gemma3ForCausalLM) calling ``fn(activation [B, T, width])`` at
    ``site`` of ``layer``; a tensor returned replaces the activation. Returns the handle."""
    block = model.model.layers[layer]

    def out_hook(_m, _args, out):
        a = out[0] if isinstance(out, tuple) else out
        new = fn(a)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    if site == "attn_out":
        def pre(_m, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return block.self_attn.o_proj.register_forward_pre_hook(pre)
    module = {"resid_post": block, "mlp_in": block.pre_feedforward_layernorm,
              "mlp_out": block.post_feedforward_layernorm}[site]
    return module.register_forward_hook(out_hook)


@torch.no_grad()
def site_acts(model, rows: Tensor, site: str, layers: Sequence[int]) -> dict[int, Tensor]:
    """The activation at ``site`` of each of ``layers`` on ``rows [B, T]``: {L: [B, T, width]}."""
    got = {}
    hs = [site_hook(model, site, L, lambda a, L=L: got.__setitem__(L, a.detach())) for L in layers]
    try:
        model(input_ids=rows)
    finally:
        for h in hs:
            h.remove()
    return got


def random_saes(model, rows: Tensor, site: str, *, d_sae: int = 48, active: float = 0.15,
                seed: int = 1, sites: Optional[Sequence[int]] = None,
                layers: Optional[Sequence[int]] = None):
    """Random JumpReLU SAEs at ``site`` of every layer of ``model`` (or a crosscoder over the
    layers ``sites``; SAEs at ``layers`` only when given), thresholds calibrated on the activations at the site on ``rows`` so that
    about ``active`` of the features fire (support.transcoders.random_transcoders)."""
    n_layers = len(model.model.layers)
    acts = site_acts(model, rows, site, range(n_layers))
    x = torch.stack([acts[L].flatten(0, 1) for L in range(n_layers)])  # [n_layers, B*T, width]
    return random_transcoders(mlp_in=x, d_sae=d_sae, active=active, seed=seed, site=site,
                              sites=sites, layers=layers, model_name="test/tiny-gemma-3")
