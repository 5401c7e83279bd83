"""Readers of circuit-tracer's native transcoder files (safety-research/circuit-tracer).

Per-layer transcoders: ``layer_{i}.safetensors`` with ``W_enc [d_sae, d_model]``,
``W_dec [d_sae, d_model]``, ``b_enc [d_sae]``, ``b_dec [d_model]``, optional
``activation_function.threshold [d_sae]`` (JumpReLU; without it the activation is ReLU, i.e.
threshold 0) and optional ``W_skip [d_model, d_model]`` applied as ``x @ W_skip.T``.

Cross-layer transcoders: per source layer i, ``W_enc_{i}.safetensors`` with
``W_enc_{i} [d_sae, d_model]``, ``b_enc_{i} [d_sae]``, ``b_dec_{i} [d_model]``, optional
``threshold_{i} [d_sae]`` and ``W_skip_{i} [d_model, d_model]`` (applied as ``x @ W_skip``, as
circuit-tracer's CLT does), and ``W_dec_{i}.safetensors`` with
``W_dec_{i} [d_sae, n_layers - i, d_model]``.

Encoders are stored feature-major; they are returned as transposed views
``W_enc [d_model, d_sae]`` of the memory map (no copy).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .base import LayerTranscoder
from .checks import TranscoderLoadError, expect_shape
from .safetensors_mmap import SafetensorsFile

PLT_FILE = re.compile(r"layer_(\d+)\.safetensors$")
CLT_ENC_FILE = re.compile(r"W_enc_(\d+)\.safetensors$")


def load_plt_layer(path: Path, where: str) -> tuple[LayerTranscoder, str]:
    """One ``layer_{i}.safetensors`` -> (transcoder, activation name)."""
    f = SafetensorsFile(path)
    if "k" in f:
        raise TranscoderLoadError(f"{where}: TopK transcoders are not supported "
                                  "(cltrace reads JumpReLU and ReLU transcoders)")
    W_enc = f.tensor("W_enc")  # [d_sae, d_model]
    expect_shape(W_enc, [None, None], f"{where}: W_enc")
    d_sae, d_model = W_enc.shape
    W_dec = f.tensor("W_dec")  # [d_sae, d_model]
    expect_shape(W_dec, [d_sae, d_model], f"{where}: W_dec")
    threshold, activation = _threshold(f, ("activation_function.threshold", "threshold"), d_sae,
                                       where)
    W_skip = f.tensor("W_skip").T if "W_skip" in f else None  # x @ W_skip.T
    tc = LayerTranscoder(W_enc=W_enc.T, b_enc=f.tensor("b_enc"), threshold=threshold,
                         W_dec=W_dec.unsqueeze(1), b_dec=f.tensor("b_dec"), W_skip=W_skip)
    return tc, activation


def load_clt_layer(folder: Path, layer: int, n_layers: int,
                   where: str) -> tuple[LayerTranscoder, str]:
    """Source layer ``layer`` of a CLT in ``folder`` (W_enc_{i} and W_dec_{i} files)."""
    enc = SafetensorsFile(folder / f"W_enc_{layer}.safetensors")
    dec_path = folder / f"W_dec_{layer}.safetensors"
    if not dec_path.is_file():
        raise TranscoderLoadError(f"{where}: {dec_path.name} is missing next to "
                                  f"W_enc_{layer}.safetensors")
    dec = SafetensorsFile(dec_path)
    W_enc = enc.tensor(f"W_enc_{layer}")  # [d_sae, d_model]
    expect_shape(W_enc, [None, None], f"{where}: W_enc_{layer}")
    d_sae, d_model = W_enc.shape
    W_dec = dec.tensor(f"W_dec_{layer}")  # [d_sae, n_layers - layer, d_model]
    expect_shape(W_dec, [d_sae, n_layers - layer, d_model], f"{where}: W_dec_{layer}")
    threshold, activation = _threshold(enc, (f"threshold_{layer}",), d_sae, where)
    key = f"W_skip_{layer}"
    tc = LayerTranscoder(W_enc=W_enc.T, b_enc=enc.tensor(f"b_enc_{layer}"), threshold=threshold,
                         W_dec=W_dec, b_dec=enc.tensor(f"b_dec_{layer}"),
                         W_skip=enc.tensor(key) if key in enc else None)
    return tc, activation


def _threshold(f: SafetensorsFile, keys: tuple[str, ...], d_sae: int, where: str):
    for key in keys:
        if key in f:
            t = f.tensor(key)
            if t.numel() != d_sae:
                raise TranscoderLoadError(f"{where}: {key} has shape {list(t.shape)}, "
                                          f"expected [{d_sae}]")
            return t.reshape(d_sae), "jump_relu"
    return torch.zeros(d_sae, dtype=f.tensor("b_enc").dtype), "relu"  # ReLU == JumpReLU at 0
