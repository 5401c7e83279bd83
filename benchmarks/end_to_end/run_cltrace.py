"""One cltrace attribution run for bench_attribution.py: phase times, peak RSS, the graph.

Run as a subprocess (a fresh process per case, so peak RSS is that case's own). Writes
``<out>.json`` (times in s, peak RSS in MiB after each phase) and ``<out>.safetensors``
(the edges on [visited features, errors, tokens, logits] with the features' (layer, pos, feature)).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.harness import peak_rss_mib

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--prompt", required=True, help="a .pt file of token ids")
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bounded", choices=["auto", "yes", "no"], default="auto")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="of the linear model (float64: a reference for the fp32 edges' rounding)")
    ap.add_argument("--skip-positions", type=int, default=1,
                    help="leading positions without features (circuit-tracer zeroes <bos>)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from cltrace.attribution import attribute
    from cltrace.export.neuronpedia import write_neuronpedia
    from cltrace.models import load_model
    from cltrace.graph import prune
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoders import load_transcoders

    res: dict = {"times": {}, "rss_mib": {}}
    T, M = res["times"], res["rss_mib"]
    t0 = time.perf_counter()
    loaded = load_model("gemma-3-270m", progress=lambda s: None)
    tcs = load_transcoders(a.transcoders)
    rm = ReplacementModel(loaded.model, tcs, tokenizer=loaded.tokenizer, skip_positions=a.skip_positions,
                          dtype=getattr(torch, a.dtype))
    T["load"], M["load"] = time.perf_counter() - t0, peak_rss_mib()
    tokens = torch.load(a.prompt)
    phases: dict = {}
    t0 = time.perf_counter()
    bounded = {"auto": None, "yes": True, "no": False}[a.bounded]
    graph = attribute(tokens, rm, max_feature_nodes=a.max_feature_nodes, batch_size=a.batch_size,
                      timings=phases, bounded=bounded)
    total = time.perf_counter() - t0
    T["forward"] = phases["forward"]
    T["attribution"] = total - phases["forward"]
    M["attribution"] = peak_rss_mib()
    t0 = time.perf_counter()
    pr = prune(graph)
    T["pruning"], M["pruning"] = time.perf_counter() - t0, peak_rss_mib()
    t0 = time.perf_counter()
    write_neuronpedia(graph, Path(a.out).parent / (Path(a.out).name + "-graph"), "bench", result=pr)
    T["export"], M["export"] = time.perf_counter() - t0, peak_rss_mib()
    res.update(n_active=int(graph.settings["n_active_features"]), n_visited=graph.n_features,
               n_logits=graph.n_logits, n_pos=graph.n_pos, bounded=graph.settings["bounded"],
               kept_nodes=int(pr.node_mask.sum()), threads=torch.get_num_threads(),
               phases_inner=phases)
    from safetensors.torch import save_file
    save_file({"features": graph.features.contiguous(), "edges": graph.edges.float().contiguous(),
               "logit_tokens": graph.logit_tokens.contiguous()}, a.out + ".safetensors")
    Path(a.out + ".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
    from cltrace.cli import exit_quickly

    exit_quickly()  # as the cltrace console script ends
