"""What ``--qk`` costs: explain_attention against the graph's own attribution, in one process.

Per case, each repetition times ``attribute`` (its phases), ``prune``, then
``explain_attention`` at its defaults (its phases: the forward it reruns, the head loadings of
the kept edges, the QK traces), with the peak memory of each call (VmHWM reset per call,
:func:`benchmarks.harness.peak_bytes`) and the FLOP floor of the attention work beside it:

* head loadings: the head-free passes, (T + S) x n_layers x (the W_O or W_V product, and the
  affine skip), and the one-hop GEMMs, T x S x n_heads x head_dim x 2 per layer (T kept
  targets, S kept sources);
* QK: per traced side, head_dim seeds of the backward from r_L at its position (L attention
  layers and L skips at each position up to it) and their contraction with the active
  features below it (2 d each).

The matmul rate is measured beside each repetition (``bench_attribution.machine_flops``).

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_attention --repeat 3
    PYTHONPATH=python python -m benchmarks.end_to_end.bench_attention --cases readme,synthetic64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ..harness import peak_bytes
from .bench_attribution import machine_flops

ROOT = Path(__file__).resolve().parents[2]
README_PROMPT = "The capital of France is"


def attention_floor(report, graph, state, n_layers: int, d: int, H: int, n_kv: int, hd: int,
                    skip: bool) -> dict:
    """FLOPs of the head loadings and the QK sides of ``report`` (see the module doc)."""
    T = int(report.edges[:, 0].unique().numel())
    S = int(report.edges[:, 1].unique().numel())
    w_o, w_v, sk = 2 * d * H * hd, 2 * n_kv * hd * d, (2 * d * d if skip else 0)
    loadings = (T * (w_o + sk) + S * (w_v + sk)) * n_layers + T * S * H * hd * 2 * n_layers
    n = state.n_pos
    attn = 2 * d * H * hd + 2 * n_kv * hd * d + 2 * H * hd * n
    layer_of = state.active_features().layer
    sides = {("q", t.layer, t.head, t.query_pos) for t in report.traces}
    sides |= {("k", t.layer, t.head // (H // n_kv), t.key_pos) for t in report.traces}
    qk = 0.0
    for _, L, _, p in sides:
        qk += hd * ((attn + sk) * L * (p + 1) + int((layer_of < L).sum()) * 2 * d)
    return {"loadings_flop": loadings, "qk_flop": qk, "kept_targets": T, "kept_sources": S,
            "qk_sides": len(sides)}


def main() -> None:
    from cltrace.attention import QKSettings, explain_attention
    from cltrace.attribution import attribute
    from cltrace.graph import prune
    from cltrace.models import load_model
    from cltrace.replacement import ReplacementModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="readme,synthetic64",
                    help="readme: the README's prompt on the trained starter set (what "
                         "`cltrace attribute --qk` runs); synthetic64: 64 tokens of calibration "
                         "text on the synthetic plt+skip set (width 4096, L0 8), 2048 features")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    a = ap.parse_args()
    lm = load_model("gemma-3-270m", progress=lambda s: None)
    cfg = lm.model.config
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "load": os.getloadavg(), "cases": []}
    for case in a.cases.split(","):
        if case == "readme":
            from cltrace.training.starter import starter_transcoders

            tcs = starter_transcoders(lm, progress=lambda s: None, bar=False)
            prompt, m = README_PROMPT, 5000
        else:
            from cltrace.transcoders import load_transcoders
            from .inputs import prompts, transcoder_sets

            inp = Path(a.out) / "inputs"
            inp.mkdir(parents=True, exist_ok=True)
            tcs = load_transcoders(transcoder_sets(inp, lm, 4096, 8, 2048)["plt"]["cltrace"])
            prompt, m = torch.load(prompts(inp, lm.tokenizer, [64])[64]), 2048
        rm = ReplacementModel(lm.model, tcs, tokenizer=lm.tokenizer)
        runs = []
        for _ in range(a.repeat):
            phases: dict = {}
            box: dict = {}

            def run_attribute():
                t0 = time.perf_counter()
                box["graph"] = attribute(prompt, rm, max_feature_nodes=m, timings=phases)
                phases["attribute"] = time.perf_counter() - t0

            attr_peak = peak_bytes(run_attribute, "cpu")
            graph = box["graph"]
            t0 = time.perf_counter()
            result = prune(graph)
            phases["prune"] = time.perf_counter() - t0
            qk_phases: dict = {}

            def run_explain():
                t0 = time.perf_counter()
                box["report"] = explain_attention(rm, graph, result, QKSettings(qk=True), timings=qk_phases)
                qk_phases["total"] = time.perf_counter() - t0

            qk_peak = peak_bytes(run_explain, "cpu")
            rate = machine_flops()
            state = rm.run(graph.tokens, all_logits=False)
            fl = attention_floor(box["report"], graph, state, cfg.num_hidden_layers, cfg.hidden_size,
                                 cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                 skip=tcs.layers[0].W_skip is not None)
            runs.append({"phases": phases, "attention": qk_phases, "attribute_peak_mib": attr_peak / 2**20,
                         "attention_peak_mib": qk_peak / 2**20, "matmul_gflops": rate / 1e9,
                         "floor": fl, "floor_s": (fl["loadings_flop"] + fl["qk_flop"]) / rate,
                         "n_pos": graph.n_pos, "n_features": graph.n_features,
                         "kept_edges": int(result.edge_mask.sum()), "traces": len(box["report"].traces)})
            r = runs[-1]
            print(f"{case}: attribute {phases['attribute']:.2f}s (peak {r['attribute_peak_mib']:.0f} MiB), "
                  f"explain {qk_phases['total']:.2f}s = forward {qk_phases['forward']:.2f} + loadings "
                  f"{qk_phases['loadings']:.2f} + qk {qk_phases['qk']:.2f} (peak {r['attention_peak_mib']:.0f} MiB); "
                  f"ratio {qk_phases['total'] / phases['attribute']:.2f}; floor {r['floor_s']:.2f}s at "
                  f"{rate / 1e9:.0f} GFLOP/s; {r['kept_edges']} kept edges, {fl['kept_targets']} targets, "
                  f"{fl['kept_sources']} sources, {fl['qk_sides']} QK sides", flush=True)
        ratio = statistics.median(r["attention"]["total"] / r["phases"]["attribute"] for r in runs)
        report["cases"].append({"case": case, "median_ratio": ratio, "runs": runs})
        print(f"{case}: median explain / attribute = {ratio:.2f}")
    out = Path(a.out) / "attention.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
