"""``cltrace inspect TRANSCODERS``: what a transcoder set holds, without loading it into RAM."""
from __future__ import annotations

import argparse
import json
from typing import Optional

from ..settings import format_layers, parse_layers

NAME = "inspect"
HELP = "show what a transcoder set holds (type, layers, width, L0, skip, dtype, size)"
DESCRIPTION = """\
Find and describe a transcoder set without reading its weights (files are memory-mapped).

TRANSCODERS is a local folder or a Hugging Face reference owner/repo/folder[@revision]:
  google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small   all layers of one variant
  google/gemma-scope-2-270m-pt/transcoder_all/layer_5_width_16k_l0_small_affine
  google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium             a cross-layer transcoder
  ./my-transcoders          Gemma Scope 2 or circuit-tracer files (layer_*.safetensors, ...)
Set HF_HUB_OFFLINE=1 to use only what is in the Hugging Face cache.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("transcoders", metavar="TRANSCODERS", help="folder or hub reference")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="LIST",
                   help="source layers to load, e.g. '0-5,9' (default: all)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="also check that the set fits this model (name, hub id or path)")
    p.add_argument("--verify", choices=["none", "encoder", "all"], default="none",
                   help="scan weights for NaN/inf: 'encoder' = all but decoders, 'all' = "
                        "everything (reads the whole set); default: none")
    p.add_argument("--per-layer", action="store_true", help="one line per source layer")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ..transcoders import load_transcoders

    model_config = _model_config(args.model) if args.model else None
    ts = load_transcoders(args.transcoders, layers=args.layers, model_config=model_config,
                          verify=args.verify)
    summary = summarize(ts)
    summary["verified"] = args.verify
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, per_layer=args.per_layer))
    return 0


def summarize(ts) -> dict:
    """A JSON-able description of a TranscoderSet (any dictionary: its sites included)."""
    info = ts.info
    l0 = info.get("l0")
    layers = []
    for i, tc in sorted(ts.layers.items()):
        layers.append({"layer": i, "d_sae": tc.d_sae, "writes_to": ts.targets(i),
                       "skip": tc.W_skip is not None,
                       "l0": l0.get(i) if isinstance(l0, dict) else l0,
                       "bytes": sum(t.numel() * t.element_size() for t in tc.tensors().values())})
    return {
        "source": ts.source, "folder": info.get("folder", ""), "layout": info.get("layout", ""),
        "kind": ts.kind, "what": ts.what, "site_in": ts.site_in, "site_out": ts.site_out,
        "sites": None if ts.sites is None else list(ts.sites),
        "variant": info.get("variant", ""), "model_name": ts.model_name,
        "n_layers": ts.n_layers, "layers": sorted(ts.layers), "d_model": ts.d_model,
        "d_sae": ts.d_sae, "skip": bool(info.get("skip")),
        "activation": info.get("activation", "jump_relu"), "dtype": str(ts.dtype).split(".")[-1],
        "bytes": info.get("bytes", ts.nbytes), "per_layer": layers,
    }


_KINDS = {"plt": "PLT (per-layer transcoders)", "clt": "CLT (cross-layer transcoder)"}


def format_summary(s: dict, per_layer: bool = False) -> str:
    l0s = [x["l0"] for x in s["per_layer"] if x["l0"] is not None]
    rows = [
        ("source", s["source"]),
        ("folder", s["folder"]) if s["folder"] != s["source"] else None,
        ("layout", s["layout"] + (f" ({s['variant']})" if s["variant"] else "")),
        ("type", _KINDS.get(s["kind"], s["kind"]) if s["site_in"] == "mlp_in" and s["site_out"] == "mlp_out"
         else s["what"]),
        ("sites", f"reads {s['site_in']}, writes {s['site_out']}"
         + (f" (layers {format_layers(s['sites'])})" if s["sites"] else "")),
        ("model", (s["model_name"] or "?") + f", {s['n_layers']} layers"),
        ("layers", f"{len(s['layers'])} of {s['n_layers']}: {format_layers(s['layers'])}"),
        ("d_model", str(s["d_model"])),
        ("width", f"{s['d_sae']} features per layer (d_sae)"),
        ("L0", (f"{min(l0s)}..{max(l0s)} (config)" if len(set(l0s)) > 1 else f"{l0s[0]} (config)")
         if l0s else "not given"),
        ("skip", f"yes (W_skip [{s['d_model']}, {s['d_model']}])" if s["skip"] else "no"),
        ("activation", s["activation"]),
        ("dtype", s["dtype"]),
        ("bytes", f"{s['bytes']:,} ({_human(s['bytes'])}, memory-mapped)"),
        ("verified", "NaN/inf not scanned (use --verify)" if s["verified"] == "none"
         else f"no NaN/inf ({s['verified']})"),
    ]
    out = [f"{k + ':':<12}{v}" for k, v in filter(None, rows)]
    if per_layer:
        out.append(f"{'layer':>5} {'d_sae':>8} {'writes to':>10} {'L0':>6} {'skip':>5} "
                   f"{'bytes':>12}")
        for x in s["per_layer"]:
            out.append(f"{x['layer']:>5} {x['d_sae']:>8} {format_layers(x['writes_to']):>10}"
                       f" {'' if x['l0'] is None else x['l0']:>6} {'yes' if x['skip'] else 'no':>5}"
                       f" {x['bytes']:>12,}")
    return "\n".join(out)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _model_config(name: str) -> Optional[object]:
    from ..models import load_config

    return load_config(name)
