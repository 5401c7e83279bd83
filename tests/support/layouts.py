"""A transcoder set written in every layout cltrace reads, for tests.

The ``write_*`` functions write the *same* weights (a set of
:func:`support.transcoders.random_transcoders`, say) in the exact Gemma Scope 2 and
circuit-tracer file layouts, so a test can load each layout and compare against the original
(``assert_sets_equal``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cltrace.transcoders import HOOK_IN, HOOK_OUT, TranscoderSet
from .transcoders import MODEL_NAME


def gemmascope_config(layer: int, d_sae: int, skip: bool, **overrides) -> dict:
    config = {"hf_hook_point_in": HOOK_IN.format(L=layer),
              "hf_hook_point_out": HOOK_OUT.format(L=layer),
              "width": d_sae, "model_name": MODEL_NAME, "architecture": "jump_relu",
              "l0": 10 + layer, "affine_connection": skip, "type": "transcoder"}
    config.update(overrides)
    return config


def write_gemmascope_plt(root: Path, ts: TranscoderSet,
                         variant: str = "width_16k_l0_small") -> Path:
    """``root/layer_{L}_{variant}[_affine]/{config.json,params.safetensors}``; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for layer, tc in ts.layers.items():
        skip = tc.W_skip is not None
        folder = root / f"layer_{layer}_{variant}{'_affine' if skip else ''}"
        folder.mkdir(exist_ok=True)
        params = {"w_enc": tc.W_enc, "w_dec": tc.W_dec[:, 0], "b_enc": tc.b_enc,
                  "b_dec": tc.b_dec, "threshold": tc.threshold}
        if skip:
            params["affine_skip_connection"] = tc.W_skip  # [d_in, d_out], x @ A
        _save(params, folder / "params.safetensors")
        (folder / "config.json").write_text(json.dumps(gemmascope_config(layer, tc.d_sae, skip)))
    return root


def write_gemmascope_clt(folder: Path, ts: TranscoderSet, full_width: bool = True,
                         config: bool = True) -> Path:
    """``folder/params_layer_{i}.safetensors`` (w_dec over all n_layers targets, zero below
    the source, when ``full_width``); returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, tc in ts.layers.items():
        w_dec = tc.W_dec
        if full_width:
            w_dec = torch.cat([w_dec.new_zeros(tc.d_sae, i, w_dec.shape[2]), w_dec], dim=1)
        params = {"w_enc": tc.W_enc, "w_dec": w_dec, "b_enc": tc.b_enc, "b_dec": tc.b_dec,
                  "threshold": tc.threshold}
        if tc.W_skip is not None:
            params["affine_skip_connection"] = tc.W_skip
        _save(params, folder / f"params_layer_{i}.safetensors")
    if config:
        skip = any(tc.W_skip is not None for tc in ts.layers.values())
        cfg = gemmascope_config(0, ts.d_sae, skip, type="transcoder")
        cfg["hf_hook_point_in"] = HOOK_IN.format(L="{L}")
        cfg["hf_hook_point_out"] = HOOK_OUT.format(L="{L}")
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def write_circuit_tracer_plt(folder: Path, ts: TranscoderSet) -> Path:
    """``folder/layer_{i}.safetensors`` with feature-major W_enc and W_skip applied as
    ``x @ W_skip.T``; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, tc in ts.layers.items():
        params = {"W_enc": tc.W_enc.T, "W_dec": tc.W_dec[:, 0], "b_enc": tc.b_enc,
                  "b_dec": tc.b_dec, "activation_function.threshold": tc.threshold}
        if tc.W_skip is not None:
            params["W_skip"] = tc.W_skip.T
        _save(params, folder / f"layer_{i}.safetensors")
    return folder


def write_circuit_tracer_clt(folder: Path, ts: TranscoderSet) -> Path:
    """``folder/W_enc_{i}.safetensors`` + ``W_dec_{i}.safetensors``; returns folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, tc in ts.layers.items():
        enc = {f"W_enc_{i}": tc.W_enc.T, f"b_enc_{i}": tc.b_enc, f"b_dec_{i}": tc.b_dec,
               f"threshold_{i}": tc.threshold}
        if tc.W_skip is not None:
            enc[f"W_skip_{i}"] = tc.W_skip  # circuit-tracer's CLT applies x @ W_skip
        _save(enc, folder / f"W_enc_{i}.safetensors")
        _save({f"W_dec_{i}": tc.W_dec}, folder / f"W_dec_{i}.safetensors")
    return folder


def assert_sets_equal(a: TranscoderSet, b: TranscoderSet) -> None:
    """Same kind, layers and bit-identical tensors (dtype included)."""
    assert a.kind == b.kind and a.n_layers == b.n_layers, (a.kind, b.kind, a.n_layers, b.n_layers)
    assert sorted(a.layers) == sorted(b.layers)
    for i in a.layers:
        ta, tb = a.layers[i].tensors(), b.layers[i].tensors()
        assert ta.keys() == tb.keys(), (i, ta.keys(), tb.keys())
        for k in ta:
            assert ta[k].dtype == tb[k].dtype, (i, k, ta[k].dtype, tb[k].dtype)
            assert ta[k].shape == tb[k].shape, (i, k, ta[k].shape, tb[k].shape)
            assert torch.equal(ta[k], tb[k]), (i, k)


def _save(params: dict, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in params.items()}, str(path))
