"""Writers of dictionary sets in the Gemma Scope 2 layout (what cltrace's loaders read back).

PLT and SAEs: ``{root}/layer_{L}_width_{W}_l0_{l0}[_affine]/{config.json, params.safetensors}``
(an SAE's config names only ``hf_hook_point_in``, its site);
CLT and crosscoders: ``{root}/params_layer_{i}.safetensors`` plus a shared ``config.json``
(a crosscoder's i indexes its layers), in the published shapes: ``w_dec [d_sae, n_layers, d_model]`` for every source layer i, zeros in the layers
below i (what circuit-tracer's and SAELens' Gemma Scope 2 loaders stack across files). Keys
``w_enc [d_in, d_sae]``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and optionally
``affine_skip_connection [d_in, d_out]``. config.json holds the Gemma Scope 2 keys
(``hf_hook_point_in``, ``hf_hook_point_out``, ``width``, ``model_name``, ``architecture``,
``l0``, ``affine_connection``, ``type``) plus ``cltrace_info`` (provenance; other readers
ignore it). Every file is written
to a temporary name and renamed, and the whole set is built in a temporary folder that is
renamed onto ``root`` last, so a failure leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .base import TranscoderSet
from ..errors import UsageError
from ..models.sites import hook_point


def _width_name(d_sae: int) -> str:
    return f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)


def _config(ts: TranscoderSet, layer: Optional[int], l0, affine: bool) -> dict:
    L = "{L}" if layer is None else layer
    hooks = {"hf_hook_point_in": hook_point(ts.site_in, L)}
    if ts.site_out != ts.site_in:  # a transcoder; an SAE's output is its input site
        hooks["hf_hook_point_out"] = hook_point(ts.site_out, L)
    kind = {} if not ts.is_transcoder else {"type": "clt" if ts.kind == "clt" else "transcoder"}
    return {**hooks, "width": ts.d_sae, "model_name": ts.model_name, "architecture": "jump_relu",
            "l0": l0, "affine_connection": affine, **kind,
            **({"cltrace_info": ts.info} if ts.info else {})}


def _published_w_dec(W_dec, layer: int, n_layers: int):  # layer, n_layers: in ts.sites if set
    """``[d_sae, n_layers - layer, d_model]`` -> ``[d_sae, n_layers, d_model]``, zeros below."""
    d_sae, n_out, d_model = W_dec.shape
    if n_out == n_layers:
        return W_dec
    if n_out != n_layers - layer:
        raise UsageError(f"CLT source layer {layer} writes to {n_out} layers; a {n_layers}-layer "
                         f"CLT's source layer {layer} writes to {n_layers - layer}")
    full = torch.zeros(d_sae, n_layers, d_model, dtype=W_dec.dtype)
    full[:, layer:] = W_dec.detach().cpu()
    return full


def _clt_w_dec(ts: TranscoderSet, L: int):
    if ts.sites is None:
        return _published_w_dec(ts.layers[L].W_dec, L, ts.n_layers)
    return _published_w_dec(ts.layers[L].W_dec, ts.sites.index(L), len(ts.sites))


def save_gemmascope(ts: TranscoderSet, root: str | os.PathLike, *, l0="custom") -> Path:
    """Write ``ts`` under ``root`` (which must not exist yet) in the Gemma Scope 2 layout (a
    crosscoder's root should be named ``layer_{sites}_width_{W}_l0_{l0}`` to be read back)."""
    from safetensors.torch import save_file

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} already exists; choose a new folder or remove it")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        affine = any(tc.W_skip is not None for tc in ts.layers.values())
        for L, tc in sorted(ts.layers.items()):
            params = {"w_enc": tc.W_enc, "b_enc": tc.b_enc, "threshold": tc.threshold, "b_dec": tc.b_dec,
                      "w_dec": tc.W_dec[:, 0] if ts.kind == "plt" else _clt_w_dec(ts, L)}
            if tc.W_skip is not None:
                params["affine_skip_connection"] = tc.W_skip
            params = {k: v.detach().cpu().contiguous() for k, v in params.items()}
            if ts.kind == "plt":
                folder = tmp / f"layer_{L}_width_{_width_name(tc.d_sae)}_l0_{l0}{'_affine' if affine else ''}"
                folder.mkdir()
                save_file(params, folder / "params.safetensors")
                (folder / "config.json").write_text(json.dumps(_config(ts, L, l0, affine), indent=1))
            else:
                i = L if ts.sites is None else ts.sites.index(L)
                save_file(params, tmp / f"params_layer_{i}.safetensors")
        if ts.kind == "clt":
            (tmp / "config.json").write_text(json.dumps(_config(ts, None, l0, affine), indent=1))
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
