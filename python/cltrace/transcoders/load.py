"""``load_transcoders``: one entry point for every dictionary layout and location.

    ts = load_transcoders("google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small")
    ts = load_transcoders("/data/gs2-270m/clt/width_262k_l0_medium", layers=[0, 1, 2])
    saes = load_transcoders("google/gemma-scope-2-270m-pt/resid_post_all/width_16k_l0_small")

detects the layout (:mod:`.resolve`), reads the files lazily (memory maps, :mod:`.gemmascope`,
:mod:`.circuit_tracer`), validates them (:mod:`.checks`) and returns a :class:`TranscoderSet`.
Weights are copied only when ``device`` or ``dtype`` asks for a change.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from . import circuit_tracer as ct
from . import ct_config
from . import gemmascope as gs
from .base import LayerTranscoder, TranscoderSet
from .checks import (TranscoderLoadError, Verify, check_complete, check_finite, check_layer,
                     check_model, check_set, gemma3_size, model_dims, read_sites)
from .resolve import Plan, parse_hub_ref, resolve_hub, resolve_local
from .safetensors_mmap import SafetensorsFile


def load_transcoders(ref: Union[str, os.PathLike], *, layers: Optional[Sequence[int]] = None,
                     device: Union[str, torch.device, None] = None,
                     dtype: Union[str, torch.dtype, None] = None, model_config: Any = None,
                     verify: Verify = "encoder") -> TranscoderSet:
    """Load a dictionary set: transcoders, a CLT, SAEs or a crosscoder (the sites they read
    and write come from each config.json's hook points, else from the Gemma Scope 2 folder
    name, else transcoders are assumed).

    ref: a local folder, or a Hugging Face reference ``owner/repo/sub/folder[@revision]``; a
        Gemma Scope 2 folder of many variants (``transcoder_all``, ``resid_post_all``, ...) is
        narrowed with a variant 'subfolder' such as ``.../transcoder_all/width_16k_l0_small``.
    layers: source layers to load (default: all; then transcoders must cover every layer of
        the model, SAEs may cover some).
    device, dtype: move/convert the weights (this copies them; dtype may be a name like
        "bf16"); default: leave them memory-mapped on the CPU in the file's dtype.
    model_config: a transformers model or config the set must fit (d_model, layers).
    verify: NaN/inf scan: "encoder" (all but decoders, default), "all", or "none".
    """
    where = str(ref)
    path = Path(ref).expanduser()
    if (path.exists() or path.is_absolute() or where.startswith((".", "~"))
            or path.parent.is_dir() and gs.parse_variant(path.name)):
        folder, p, hub = *resolve_local(path, layers, where), False
    elif parse_hub_ref(where):
        folder, p, hub = *resolve_hub(where, layers), True
    else:
        raise FileNotFoundError(f"transcoders not found: {where} is neither a local folder nor "
                                "a Hugging Face reference owner/repo/folder[@revision]")
    model_n_layers = model_dims(model_config)[0] if model_config is not None else None
    ts = _read(folder, p, where, model_n_layers, _folder_sites(where, folder))
    ts.source = where
    # a stable name for graphs and pages: the hub reference, or the folder's name (never a
    # path of this machine); the starter sets replace it with their own
    ts.info.setdefault("set_id", where if hub else path.resolve().name)
    for layer, tc in ts.layers.items():
        check_layer(tc, f"{where} layer {layer}")
    check_set(ts, where)
    if model_config is not None:
        check_model(ts, model_config, where)
    # transcoders must cover the model (attribution needs every layer); SAEs and crosscoders
    # only the layers asked for (Gemma Scope 2 has SAEs at some layers only)
    check_complete(ts, sorted(ts.layers) if p.single or not ts.is_transcoder else layers, where)
    ts.info.update(_describe(ts, folder, p))
    if device is not None or dtype is not None:
        if dtype is not None and not isinstance(dtype, torch.dtype):
            from ..models import resolve_dtype

            dtype = resolve_dtype(dtype, torch.device("cpu"))
        ts = ts.to(device=device, dtype=dtype)  # verified after: on the GPU, and catching
    for layer, tc in ts.layers.items():         # overflow of a narrower dtype
        check_finite(tc, verify, f"{where} layer {layer}")
    return ts


def _folder_sites(where: str, folder: Path) -> tuple[str, str]:
    """(site in, site out) named by the nearest Gemma Scope 2 folder name in the reference or
    the path (``resid_post_all``, ``crosscoder``, ...; transcoders when none)."""
    from ..models.sites import FOLDER_SITES

    for part in [*reversed(where.split("/")), *reversed(folder.parts)]:
        if part in FOLDER_SITES:
            return FOLDER_SITES[part]
    return "mlp_in", "mlp_out"


def _read(folder: Path, p: Plan, where: str, model_n_layers: Optional[int],
          default: tuple[str, str]) -> TranscoderSet:
    if p.layout == "gemmascope_plt":
        return _read_gemmascope_plt(folder, p, where, model_n_layers, default)
    if p.layout in ("gemmascope_clt", "gemmascope_crosscoder"):
        config = gs.read_config(folder)
        sites = read_sites(config, None, where, default)
        size = gemma3_size(config.get("model_name", ""))
        n_layers = model_n_layers or (size[0] if size else max(p.available) + 1)
        if p.sites is None:
            layers = {i: gs.load_clt_layer(folder / f[0], i, n_layers, config,
                                           f"{where} layer {i}") for i, f in p.files.items()}
        else:  # file i of a crosscoder holds the features read at layer sites[i]
            layers = {L: gs.load_clt_layer(folder / f[0], p.sites.index(L), len(p.sites),
                                           config, f"{where} layer {L}")
                      for L, f in p.files.items()}
        info = {**config.get("cltrace_info", {}), **({"l0": config["l0"]} if "l0" in config else {})}
        return TranscoderSet("clt", n_layers, layers, model_name=config.get("model_name", ""),
                             info=info, site_in=sites[0], site_out=sites[1],
                             sites=None if p.sites is None else tuple(p.sites))
    if p.layout == "circuit_tracer_yaml":
        return ct_config.load_yaml_set(folder, p.layers, model_n_layers, where)
    if p.layout == "circuit_tracer_plt":
        layers, acts = {}, set()
        for i, f in p.files.items():
            layers[i], act = ct.load_plt_layer(folder / f[0], f"{where} layer {i}")
            acts.add(act)
        n_layers = model_n_layers or max(p.available) + 1
        return TranscoderSet("plt", n_layers, layers, info={"activation": "/".join(sorted(acts))})
    if p.layout == "circuit_tracer_clt":
        first = min(p.files)  # W_dec_{i} is [d_sae, n_layers - i, d_model]
        dec = SafetensorsFile(folder / f"W_dec_{first}.safetensors")
        n_layers = model_n_layers or dec.shape(f"W_dec_{first}")[1] + first
        layers, acts = {}, set()
        for i in p.files:
            layers[i], act = ct.load_clt_layer(folder, i, n_layers, f"{where} layer {i}")
            acts.add(act)
        return TranscoderSet("clt", n_layers, layers, info={"activation": "/".join(sorted(acts))})
    raise AssertionError(p.layout)


def _read_gemmascope_plt(folder: Path, p: Plan, where: str, model_n_layers: Optional[int],
                         default: tuple[str, str]) -> TranscoderSet:
    layers: dict[int, LayerTranscoder] = {}
    configs: dict[int, dict] = {}
    sites = set()
    for i, files in p.files.items():
        sub = folder / files[0].rpartition("/")[0] if "/" in files[0] else folder
        if i < 0:  # a lone folder not named layer_{L}_...: the layer is in its config.json
            i = _layer_from_config(gs.read_config(sub), where)
        tc, configs[i] = gs.load_plt_layer(sub, f"{where} layer {i}")
        sites.add(read_sites(configs[i], i, f"{where} layer {i}", default))
        layers[i] = tc
    if len(sites) > 1:
        raise TranscoderLoadError(f"{where}: layers read or write different sites "
                                  f"{sorted(sites)}")
    names = {c.get("model_name") for c in configs.values()} - {None}
    if len(names) > 1:
        raise TranscoderLoadError(f"{where}: layers were trained on different models {names}")
    model_name = names.pop() if names else ""
    size = gemma3_size(model_name)
    n_layers = model_n_layers or (size[0] if size else max(max(p.available), max(layers)) + 1)
    written = next((c["cltrace_info"] for c in configs.values() if "cltrace_info" in c), {})
    info = {**written, "l0": {i: c["l0"] for i, c in configs.items() if "l0" in c}}
    site_in, site_out = sites.pop()
    return TranscoderSet("plt", n_layers, layers, model_name=model_name, info=info,
                         site_in=site_in, site_out=site_out)


def _layer_from_config(config: dict, where: str) -> int:
    from ..models.sites import parse_hook

    parsed = parse_hook(config.get("hf_hook_point_in", ""))
    if parsed is not None and parsed[1] is not None:
        return parsed[1]
    raise TranscoderLoadError(f"{where}: cannot tell the layer: the folder is not named "
                              "layer_{L}_... and config.json has no hf_hook_point_in")


def _describe(ts: TranscoderSet, folder: Path, p: Plan) -> dict:
    files = [folder / f for fs in p.files.values() for f in fs]
    files += [Path(f) for f in ts.info.pop("files", [])]
    nbytes = sum(f.stat().st_size for f in files if f.suffix == ".safetensors" and f.is_file())
    info = {"layout": p.layout, "folder": str(folder), "bytes": nbytes,
            "layer_files": {L: [str(folder / f) for f in fs] for L, fs in p.files.items() if L >= 0},
            "skip": any(tc.W_skip is not None for tc in ts.layers.values()),
            "site_in": ts.site_in, "site_out": ts.site_out}
    if p.variant:
        info["variant"] = p.variant
        info["affine"] = gs.parse_variant(p.variant).get("affine", False)
    return info
