"""A long prompt (default 4096 tokens) through the memory-bounded attribution: peak RSS and time.

    python benchmarks/long_prompt.py [--n-pos 4096] [--max-feature-nodes 64]

Writes one JSON line: phase times, the number of active features, the peak RSS after the
forward pass and after attribution, and what a dense [rows, all nodes] buffer would take.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "out"


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-pos", type=int, default=4096)
    ap.add_argument("--max-feature-nodes", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--transcoders", default=str(OUT / "inputs/tc-plt-w4096-l0_8-gemmascope"))
    a = ap.parse_args()
    from .inputs import prompts
    from cltrace.attribution import attribute
    from cltrace.models import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoders import load_transcoders

    lm = load_model("gemma-3-270m", progress=lambda s: None)
    rm = ReplacementModel(lm.model, load_transcoders(a.transcoders), tokenizer=lm.tokenizer,
                          skip_positions=1)
    tokens = torch.load(prompts(OUT / "inputs", lm.tokenizer, [a.n_pos])[a.n_pos])
    res = {"n_pos": a.n_pos, "max_feature_nodes": a.max_feature_nodes, "rss_load_gib": rss_gib()}
    times: dict = {}
    t0 = time.perf_counter()
    g = attribute(tokens, rm, max_feature_nodes=a.max_feature_nodes, batch_size=a.batch_size,
                  timings=times, bounded=True)
    res.update(total_s=time.perf_counter() - t0, times=times, rss_peak_gib=rss_gib(),
               n_active=g.settings["n_active_features"], n_nodes=g.n_nodes,
               edges_gib=g.edges.numel() * 4 / 2**30,
               dense_rows_gib_at_8192=(8192 + g.n_logits) * (g.settings["n_active_features"]
                                       + 19 * a.n_pos + g.n_logits) * 4 / 2**30,
               bounded_rows_gib_at_8192=(8192 + g.n_logits) * (8192 + 19 * a.n_pos) * 4 / 2**30)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
