"""Transcoder sets for tests: one factory, :func:`random_transcoders`, for every random set; and
:func:`synthetic_starter_transcoders`, a set fitted to a real model's MLPs (real-model tests).

Files in the layouts cltrace reads are written by :mod:`support.layouts`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from cltrace.transcoders.base import LayerTranscoder, TranscoderSet

MODEL_NAME = "test/tiny-gemma-3"  # not a real Gemma 3 size, so no d_model is implied


def random_transcoders(kind: str = "plt", *, mlp_in: Optional[Tensor] = None, n_layers: int = 3,
                       d_model: int = 16, d_sae: int = 32, skip: bool = False, active: float = 0.15,
                       seed: int = 1, layers: Optional[Sequence[int]] = None,
                       dtype: torch.dtype = torch.float32, model_name: str = MODEL_NAME,
                       site: Optional[str] = None, sites: Optional[Sequence[int]] = None) -> TranscoderSet:
    """A random JumpReLU transcoder set: ``kind`` "plt" (one output layer each) or "clt" (the
    source layer L writes to L .. n_layers - 1), with an affine skip when ``skip``, over
    ``layers`` (default: all). ``site``: SAEs reading and writing that site instead
    (``d_model`` is then the site's width, and ``mlp_in`` the activations at the site);
    ``sites``: a crosscoder over those layers (kind "clt", the source ``sites[i]`` writes to
    ``sites[i:]``).

    Weights, per layer from one generator seeded with ``seed``, in this order: ``W_enc [d_model,
    d_sae]`` ~ N(0, 1/d_model), ``b_enc`` ~ N(0, 0.1²), ``W_dec [d_sae, n_out, d_model]`` ~ N(0,
    1/d_sae), ``b_dec`` ~ N(0, 0.1²), ``W_skip [d_model, d_model]`` ~ N(0, 0.1²/d_model).
    Thresholds:

    * **calibrated** — ``mlp_in [n_layers, n_pos, d_model]`` (a model's MLP inputs on some
      tokens) given: each feature's threshold is the ``1 - active`` quantile of its
      pre-activation over those positions (at least 1e-3), so that about ``active`` of the
      features fire per position on such inputs. ``n_layers``, ``d_model`` and ``dtype`` are
      ``mlp_in``'s. For tests that run a model (graphs, interventions, feature pages).
    * **uncalibrated** — without ``mlp_in``: U(0, 1), drawn after the layer's weights (which
      are the calibrated set's for the same seed and shapes). For tests where the values do not
      matter: file layouts, loaders, ``cltrace inspect``.

    Values are drawn in float64 for float64 sets and in float32 otherwise, then cast to
    ``dtype`` (bfloat16 sets round-trip exactly through the files)."""
    if mlp_in is not None:
        n_layers, _, d_model = mlp_in.shape
        dtype = mlp_in.dtype
    draw = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=draw)

    out = {}
    if sites is not None:
        kind, layers, site = "clt", list(sites), site or "resid_post"
    for L in (range(n_layers) if layers is None else layers):
        n_out = (1 if kind == "plt" else n_layers - L) if sites is None else len(sites) - sites.index(L)
        W_enc = randn(d_model, d_sae) / d_model ** 0.5
        b_enc = 0.1 * randn(d_sae)
        threshold = None
        if mlp_in is not None:
            z = mlp_in[L].cpu() @ W_enc + b_enc  # [n_pos, d_sae]
            threshold = torch.quantile(z.double(), 1.0 - active, dim=0).to(draw).clamp_min(1e-3)
        W_dec = randn(d_sae, n_out, d_model) / d_sae ** 0.5
        b_dec = 0.1 * randn(d_model)
        W_skip = 0.1 * randn(d_model, d_model) / d_model ** 0.5 if skip else None
        if threshold is None:
            threshold = torch.rand(d_sae, generator=g, dtype=draw)
        out[L] = LayerTranscoder(*(t if t is None else t.to(dtype)
                                   for t in (W_enc, b_enc, threshold, W_dec, b_dec, W_skip)))
    ts = TranscoderSet(kind=kind, n_layers=n_layers, layers=out, model_name=model_name)
    if site is not None:
        ts.site_in = ts.site_out = site
        ts.sites = None if sites is None else tuple(sites)
    return ts


def synthetic_starter_transcoders(loaded, *, kind: str = "plt", width: int = 4096, l0: int = 32,
                                  affine: bool = True, n_tokens: int = 4096,
                                  progress=print) -> TranscoderSet:
    """A SYNTHETIC (untrained) set for a loaded real model, built on first use and cached under
    ``cache_root()/starter/`` in the Gemma Scope 2 layout.

    :func:`cltrace.training.starter.fit_starter_set` on the MLP inputs and outputs of
    ``n_tokens`` calibration tokens (:func:`cltrace.training.starter.collect_mlp_io`): random
    encoders, each threshold calibrated so that about ``l0`` features fire per token, the affine
    skip and ``b_dec`` a least-squares fit, the decoders a ridge fit of the rest. Graphs on it
    are exact, but its features carry no learned meaning."""
    from cltrace.models import cache_root
    from cltrace.training.starter import collect_mlp_io, fit_starter_set
    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.write import save_gemmascope

    name = getattr(loaded, "name", "") or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[-64:]
    tag = f"{safe}-synthetic-{kind}-w{width}-l0_{l0}{'-affine' if affine else ''}-t{n_tokens}"
    folder = cache_root() / "starter" / tag
    if not folder.exists():
        progress(f"building the synthetic starter transcoders {tag} (once; cached in {folder}) ...")
        X, Y = collect_mlp_io(loaded.model, loaded.tokenizer, n_tokens)
        ts = fit_starter_set(X, Y, kind=kind, width=width, l0=l0, affine=affine, model_name=name)
        try:
            save_gemmascope(ts, folder, l0=l0)
        except FileExistsError:  # another process finished first: use its copy
            pass
    ts = load_transcoders(folder)
    ts.info["set_id"] = f"cltrace-starter/{tag}"
    info = ts.info or {}
    if not info.get("synthetic"):  # the loaders keep config fields; restore the provenance
        ts.info = {**info, "synthetic": True, "trained": False,
                   "graph_info": {"transcoders": f"SYNTHETIC, NOT TRAINED starter set {tag}"}}
    return ts
