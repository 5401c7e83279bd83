"""Attribution time against its FLOP floor, in one process, the matmul rate measured beside each run.

The same inputs as ``bench_attribution`` (``inputs.py``: the real Gemma 3 270M, the synthetic
plt+skip set, prompts of calibration text). Each repetition times one ``attribute`` call (the
forward excluded) and then measures the machine's fp32 matmul rate (``bench_attribution.machine_flops``),
so every ratio time / floor is taken against the rate of that moment; the floor is
``bench_attribution.floor`` of the graph's visited features. No peer: see bench_attribution for
the whole-process comparison with circuit-tracer.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_floor --cases 9:0,64:2048 --repeat 5
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

from .bench_attribution import floor, machine_flops

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    from cltrace.attribution import attribute
    from cltrace.models import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.transcoders import load_transcoders
    from .inputs import prompts, transcoder_sets

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="9:0,64:2048", help="tokens:max feature nodes (0: all)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    a = ap.parse_args()
    cases = [tuple(int(x) for x in c.split(":")) for c in a.cases.split(",")]
    inp = Path(a.out) / "inputs"
    inp.mkdir(parents=True, exist_ok=True)
    lm = load_model("gemma-3-270m", progress=lambda s: None)
    files = prompts(inp, lm.tokenizer, sorted({n for n, _ in cases}))
    tcs = load_transcoders(transcoder_sets(inp, lm, 4096, 8, 2048)["plt"]["cltrace"])
    rm = ReplacementModel(lm.model, tcs, tokenizer=lm.tokenizer, skip_positions=1)
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "batch_size": a.batch_size, "cases": []}
    for n, m in cases:
        tokens = torch.load(files[n])
        runs = []
        for _ in range(a.repeat):
            phases: dict = {}
            t0 = time.perf_counter()
            g = attribute(tokens, rm, max_feature_nodes=m or None, batch_size=a.batch_size, timings=phases)
            t = time.perf_counter() - t0 - phases["forward"]
            rate = machine_flops()
            size = {"n_pos": g.n_pos, "n_active": int(g.settings["n_active_features"]),
                    "n_visited": g.n_features, "n_logits": g.n_logits}
            f = floor(size, g.features)
            flop = f["backward_flop"] + f["contract_flop"]
            runs.append({"attribution_s": round(t, 3), "gflop_per_s": round(rate / 1e9, 1),
                         "floor_gflop": round(flop / 1e9, 1), "floor_s": round(flop / rate, 3),
                         "ratio": round(t * rate / flop, 3), "load_avg": os.getloadavg()[0], **size})
            print(json.dumps(runs[-1]), flush=True)
        med = {k: statistics.median(r[k] for r in runs) for k in ("attribution_s", "gflop_per_s", "ratio")}
        report["cases"].append({"tokens": n, "max_feature_nodes": m, "runs": runs, "median": med})
        print(f"{n} tokens, max nodes {m or 'all'}: attribution {med['attribution_s']:.2f} s, "
              f"{med['gflop_per_s']:.0f} GFLOP/s, time / floor {med['ratio']:.2f} (median of {a.repeat})")
        (Path(a.out) / "floor.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
