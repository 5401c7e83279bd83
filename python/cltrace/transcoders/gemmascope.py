"""Readers of the Gemma Scope 2 dictionary files (google/gemma-scope-2-*).

Per-layer dictionaries (transcoders, and SAEs at ``resid_post``/``attn_out``/``mlp_out``): one
folder per layer, ``transcoder_all/layer_{L}_width_{16k|262k}_l0_{small|medium|big}[_affine]/``
(SAEs: ``resid_post_all/``, ``attn_out_all/``, ``mlp_out_all/``, and the wider sweeps of a
few layers under ``resid_post/``, ``attn_out/``, ``mlp_out/``) holding
``config.json`` and ``params.safetensors`` with
``w_enc [d_in, d_sae]``, ``w_dec [d_sae, d_out]``, ``b_enc [d_sae]``, ``b_dec [d_out]``,
``threshold [d_sae]`` and, for ``_affine``, ``affine_skip_connection [d_in, d_out]`` applied as
``x @ A``. Activation: JumpReLU ``f = z * (z > threshold)`` with ``z = x @ w_enc + b_enc``.

Cross-layer transcoders (CLT): ``clt/width_{W}_l0_{..}[_affine]/params_layer_{i}.safetensors``,
the same keys per source layer i but ``w_dec [d_sae, n_layers, d_model]`` (or
``[d_sae, n_layers - i, d_model]``): source i writes to layers >= i, kept here as
``W_dec [d_sae, n_layers - i, d_model]``.

Crosscoders: ``crosscoder/layer_7_13_17_22_width_{W}_l0_{..}/params_layer_{i}.safetensors``,
i indexing the folder's layers (7, 13, 17, 22): the features of file i read the residual
stream of the i-th layer and write, like a CLT's, to it and the later ones
(``w_dec [d_sae, n, d_model]`` or ``[d_sae, n - i, d_model]`` for n layers; a 2-D
``w_dec [d_sae, d_model]`` writes to its own layer only).

Which activation a folder reads and writes is named by its config.json's
``hf_hook_point_in``/``hf_hook_point_out`` (read by :func:`.checks.read_sites`).

Every tensor stays a view of the file's memory map (see :mod:`.safetensors_mmap`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .base import LayerTranscoder
from .checks import TranscoderLoadError, expect_shape
from .safetensors_mmap import SafetensorsFile

PLT_FOLDER = re.compile(r"layer_(\d+)_(width_\w+?)$")  # layer_5_width_16k_l0_small_affine
CROSSCODER_FOLDER = re.compile(r"layer_(\d+(?:_\d+)+)_(width_\w+?)$")  # layer_7_13_17_22_width_..
CLT_FILE = re.compile(r"params_layer_(\d+)\.safetensors$")
WIDTHS = {"16k": 16384, "65k": 65536, "262k": 262144, "1m": 1048576}


def read_config(folder: Path) -> dict:
    """A folder's config.json ({} when absent)."""
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TranscoderLoadError(f"{path}: unreadable config ({e})") from None


def parse_variant(variant: str) -> dict:
    """``width_16k_l0_small_affine`` -> {"width": 16384, "l0": "small", "affine": True}."""
    m = re.fullmatch(r"width_(\w+?)_l0_(\w+?)(_affine)?", variant)
    if m is None:
        return {}
    return {"width": WIDTHS.get(m.group(1).lower()), "l0": m.group(2),
            "affine": m.group(3) is not None}


def load_plt_layer(folder: Path, where: str) -> tuple[LayerTranscoder, dict]:
    """One Gemma Scope 2 per-layer folder -> (dictionary, its config.json)."""
    config = read_config(folder)
    tc = _layer_tensors(SafetensorsFile(folder / "params.safetensors"), None, where)
    _check_width(config, tc, where)
    return tc, config


def load_clt_layer(path: Path, layer: int, n_layers: int, config: dict,
                   where: str) -> LayerTranscoder:
    """One ``params_layer_{i}.safetensors`` of a Gemma Scope 2 CLT with ``n_layers`` layers
    (of a crosscoder: ``layer`` = i and ``n_layers`` = its number of layers)."""
    tc = _layer_tensors(SafetensorsFile(path), (layer, n_layers), where)
    _check_width(config, tc, where)
    return tc


def _layer_tensors(f: SafetensorsFile, clt: Optional[tuple[int, int]],
                   where: str) -> LayerTranscoder:
    w_enc = f.tensor("w_enc")  # [d_in, d_sae]
    expect_shape(w_enc, [None, None], f"{where}: w_enc")
    d_model, d_sae = w_enc.shape
    w_dec = f.tensor("w_dec")  # PLT [d_sae, d_out]; CLT [d_sae, n_layers (- i), d_model]
    if clt is None or w_dec.dim() == 2:  # a crosscoder's 2-D w_dec: its own layer only
        expect_shape(w_dec, [d_sae, d_model], f"{where}: w_dec")
        W_dec = w_dec.unsqueeze(1)  # [d_sae, 1, d_model]
    else:
        layer, n_layers = clt
        expect_shape(w_dec, [d_sae, None, d_model], f"{where}: w_dec")
        if w_dec.shape[1] == n_layers:
            W_dec = w_dec[:, layer:, :]  # [d_sae, n_layers - layer, d_model] (strided view)
        elif w_dec.shape[1] == n_layers - layer:
            W_dec = w_dec
        else:
            raise TranscoderLoadError(
                f"{where}: w_dec writes to {w_dec.shape[1]} layers; a source layer {layer} of "
                f"a {n_layers}-layer CLT writes to {n_layers} or {n_layers - layer}")
    W_skip = f.tensor("affine_skip_connection") if "affine_skip_connection" in f else None
    return LayerTranscoder(
        W_enc=w_enc,
        b_enc=f.tensor("b_enc"),  # [d_sae]
        threshold=f.tensor("threshold"),  # [d_sae]
        W_dec=W_dec,
        b_dec=f.tensor("b_dec"),  # [d_model]
        W_skip=W_skip,  # [d_model, d_model], x @ W_skip
    )


def _check_width(config: dict, tc: LayerTranscoder, where: str) -> None:
    width = config.get("width")
    if width is not None and int(width) != tc.d_sae:
        raise TranscoderLoadError(f"{where}: config.json says width {width} but the weights "
                                  f"have {tc.d_sae} features")
    affine = config.get("affine_connection")
    if affine is not None and bool(affine) != (tc.W_skip is not None):
        raise TranscoderLoadError(
            f"{where}: config.json says affine_connection={affine} but "
            f"affine_skip_connection is {'present' if tc.W_skip is not None else 'missing'}")
