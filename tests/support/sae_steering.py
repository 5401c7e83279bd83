"""What the SAE steering tests compare against: plain forward hooks on the module of a site
(written without :mod:`cltrace.models.sites`), a greedy generation loop under them, and random
SAEs calibrated on a model's own activations at a site, saved in the Gemma Scope 2 layout."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

from .transcoders import random_transcoders


def site_module(model, site: str, layer: int):
    """(module, "output" | "input") of ``site`` at ``layer`` in a Gemma3ForCausalLM."""
    block = model.model.layers[layer]
    return {"resid_post": (block, "output"), "attn_out": (block.self_attn.o_proj, "input"),
            "mlp_out": (block.post_feedforward_layernorm, "output")}[site]


@contextlib.contextmanager
def reference_hook(model, site: str, layer: int, fn: Callable[[Tensor], Tensor]):
    """A plain hook replacing the activation ``x [1, n_pos, width]`` at the site by ``fn(x)``."""
    module, where = site_module(model, site, layer)
    if where == "input":
        h = module.register_forward_pre_hook(lambda _m, args: (fn(args[0]), *args[1:]))
    else:
        def out_hook(_m, _args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)
        h = module.register_forward_hook(out_hook)
    try:
        yield
    finally:
        h.remove()


@torch.no_grad()
def greedy(model, tokens: Tensor, n_new: int) -> tuple[Tensor, Tensor]:
    """Greedy continuation of ``tokens [n]`` under whatever hooks are on ``model``:
    (the ``n + n_new`` ids, the last position's logits of every step ``[n_new, vocab]``)."""
    seq, steps = tokens, []
    for _ in range(n_new):
        logits = model(input_ids=seq[None], use_cache=False).logits[0, -1]
        steps.append(logits)
        seq = torch.cat([seq, seq.new_tensor([int(logits.argmax())])])
    return seq, torch.stack(steps)


@torch.no_grad()
def site_activations(model, tokens: Tensor, site: str) -> Tensor:
    """Activations of every layer at ``site`` on ``tokens``: ``[n_layers, n_pos, width]``."""
    rec = {}
    n = len(model.model.layers)

    with contextlib.ExitStack() as stack:
        for L in range(n):
            stack.enter_context(reference_hook(model, site, L, lambda x, L=L: _put(rec, L, x)))
        model(input_ids=tokens[None], use_cache=False)
    return torch.stack([rec[L] for L in range(n)])


def _put(rec: dict, L: int, x: Tensor) -> Tensor:
    rec[L] = x[0].detach().clone()
    return x


def calibrated_saes(model, tokens: Tensor, site: str, d_sae: int = 32, active: float = 0.3,
                    seed: int = 1):
    """Random SAEs at ``site`` on every layer of ``model``, thresholds calibrated on the
    model's own activations there on ``tokens`` (about ``active`` of the latents fire)."""
    return random_transcoders(mlp_in=site_activations(model, tokens, site), d_sae=d_sae,
                              active=active, site=site, seed=seed)
