"""Steering with SAE latents: add a latent's decoder direction at its SAE's site.

An SAE at site S (resid_post, attn_out or mlp_out) of layer L reads the activation ``x_L``
there and encodes it as ``a = JumpReLU(x_L W_enc + b_enc)``. An :class:`Intervention` on its
latent ``i`` moves the latent from ``a_i`` to ``a_i'`` (``add=v``: ``a_i + v``, ``set=v``:
``v``, ``scale=s``: ``s a_i``) by replacing the activation at that site with

    x_L + (a_i' - a_i) W_dec[i]          (at the positions the intervention names)

so ``add=4`` adds ``4 W_dec[i]`` whatever the latent's value, and ``set=4`` clamps it (adds
``(4 - a_i) W_dec[i]``, with ``a_i`` from encoding the site in this very pass). The SAE's
reconstruction error is left in place; everything downstream is the real model. Several
interventions on one latent compose in list order, as for transcoder features.

:class:`SaeSteering` carries a model and an SAE set and offers what
:func:`cltrace.steering.generate` needs (``tokenize``, ``skip_positions_for``,
``steering_hooks``), so generation is the same loop as for transcoders.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import UsageError
from ..models.anatomy import text_parts
from ..models.sites import SAE_SITES, site_hooks
from ..replacement.model import ReplacementModel
from ..transcoders.base import TranscoderSet
from ..transcoders.checks import check_fits
from .inputs import model_input
from .interventions import Intervention, by_layer, check_interventions, new_values


def check_sae_set(saes: TranscoderSet, where: str) -> None:
    """Raise a UsageError unless ``saes`` holds per-layer SAEs (one site read and written)."""
    if saes.is_transcoder:
        raise UsageError(f"--sae {where} holds transcoders (MLP input -> MLP output), not SAEs: "
                         "steer transcoder features with --transcoders")
    if saes.site_in != saes.site_out or saes.site_in not in SAE_SITES:
        raise UsageError(f"--sae {where} holds {saes.what}; --sae steers SAEs at one of "
                         f"{', '.join(SAE_SITES)}")
    if saes.kind != "plt":
        raise UsageError(f"--sae {where} holds a crosscoder ({saes.what}); --sae steers "
                         "per-layer SAEs only")


def check_latents(interventions: Sequence[Intervention], saes: TranscoderSet, where: str) -> None:
    """Before the model loads: every intervention names a layer the set has and a latent
    inside that layer's dictionary (one-line UsageErrors naming the set)."""
    for iv in interventions:
        if iv.layer not in saes.layers:
            raise UsageError(f"--feature {iv}: {where} has no SAE at layer {iv.layer} (it has "
                             f"layers {sorted(saes.layers)})")
        d_sae = saes.layers[iv.layer].d_sae
        if iv.feature >= d_sae:
            raise UsageError(f"--feature {iv}: latent {iv.feature} is outside the dictionary "
                             f"(layer {iv.layer}'s SAE at {saes.site_in} has {d_sae} latents)")


class SaeSteering:
    """A Gemma 3 model and an SAE set at one site, for steering with its latents."""

    def __init__(self, model, saes: TranscoderSet, tokenizer=None,
                 skip_positions: Union[int, str] = "auto", model_name: str = "", images=None):
        self.images = images  # a LoadedMultimodal whose .model is ``model`` (image prompts), or None
        self.parts = text_parts(model)
        self.model, self.tokenizer = model, tokenizer
        self.model_name = model_name or getattr(model.config, "name_or_path", "") or ""
        where = saes.source or saes.model_name or "SAEs"
        check_sae_set(saes, where)
        check_fits(saes, self.parts.config, where)
        self.device = self.parts.lm_head.weight.device
        self.dtype = self.parts.lm_head.weight.dtype
        self.transcoders = saes.to(device=self.device, dtype=self.dtype)  # (the name generate reads)
        self.site = saes.site_in
        if not (skip_positions == "auto" or (isinstance(skip_positions, int) and skip_positions >= 0)):
            raise UsageError(f"skip_positions must be 'auto' or an int >= 0, got {skip_positions!r}")
        self.skip_setting = skip_positions

    # the prompt rules of the replacement model: ids checked, <bos> (or the chat prefix) skipped
    tokenize = ReplacementModel.tokenize
    is_instruction_tuned = ReplacementModel.is_instruction_tuned
    skip_positions_for = ReplacementModel.skip_positions_for

    def latents(self, layer: int, x: Tensor, features: Sequence[int], skip_positions: int) -> Tensor:
        """Activations ``[n_pos, k]`` of ``features`` of layer ``layer``'s SAE on the site
        activations ``x [n_pos, width]`` (0 in the first ``skip_positions``)."""
        sae = self.transcoders.layers[layer]
        f = torch.as_tensor(list(features), dtype=torch.long, device=x.device)
        z = x.to(sae.W_enc.dtype) @ sae.W_enc[:, f] + sae.b_enc[f]  # [n_pos, k]
        z = z * (z > sae.threshold[f])
        z[:skip_positions] = 0
        return z

    @contextlib.contextmanager
    def steering_hooks(self, interventions: Sequence[Intervention], skip_positions: int,
                       n_ref: Optional[int] = None) -> Iterator[dict]:
        """Hooks replacing the site activation ``x [1, n_pos, width]`` of each intervened
        layer by ``x + Σ_i (a_i' − a_i) W_dec[i]`` (batch 1, no KV cache). Positions resolve
        against ``n_ref`` tokens (default: each pass's length). Yields ``{"values":
        {(layer, latent): new [n_pos]}}``, filled on each pass."""
        record: dict = {"values": {}}

        def edit(L: int, ivs: list[Intervention]):
            sae = self.transcoders.layers[L]

            def fn(act: Tensor) -> Tensor:
                x = act[0]  # [n_pos, width]
                vals = new_values(ivs, lambda f: self.latents(L, x, [f], skip_positions)[:, 0],
                                  n_ref or x.shape[0], skip_positions)
                add = torch.zeros(x.shape, dtype=sae.W_dec.dtype, device=x.device)
                for f, (a0, a1) in vals.items():
                    add += (a1 - a0)[:, None] * sae.W_dec[f, 0]  # [n_pos, width]
                    record["values"][(L, f)] = a1
                return act + add[None].to(act.dtype)
            return fn

        edits = {(self.site, L): edit(L, ivs) for L, ivs in by_layer(interventions).items()}
        with site_hooks(self.parts, edit=edits):
            yield record

    def check(self, interventions: Sequence[Intervention], tokens: Tensor) -> list[Intervention]:
        """The interventions, checked against the set and the prompt ``tokens [n_pos]``."""
        return check_interventions(interventions, self.transcoders, tokens.numel(),
                                   self.skip_positions_for(tokens))

    @torch.no_grad()
    def logits(self, prompt, interventions: Sequence[Intervention] = ()) -> Tensor:
        """Logits ``[n_pos, vocab]`` of the real model on ``prompt`` (text, ids, an
        :class:`~cltrace.models.multimodal.ImagePrompt` with ``images``, or a
        :class:`~.inputs.ModelInput`) under the interventions."""
        seq = model_input(self, prompt)
        ivs = self.check(interventions, seq.tokens)
        with self.steering_hooks(ivs, self.skip_positions_for(seq.tokens)):
            return seq.logits(self.model)
