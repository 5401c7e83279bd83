"""Throughput of ``cltrace batch`` against separate ``cltrace attribute`` calls.

Every mode traces the same prompts with the real Gemma 3 270M and the default starter
transcoders, each mode a fresh command (model load, worker start and Ray start included in
its wall time, as a user would see it):

  separate     one ``cltrace attribute`` process per prompt (the model loaded each time)
  local-1/2    ``cltrace batch --workers 1|2`` (spawned workers, the model loaded once each)
  ray-1/2      ``cltrace batch --ray --workers 1|2`` (a local Ray cluster started by the command)
  contrast-local-N, contrast-ray-N
               ``cltrace contrast`` on the same prompts (one JSONL, ``label`` a/b alternating):
               the same tracing runner, then the report; its per-prompt cost against batch's

Reported per mode: prompts/min over the wall time, the mean traced seconds per prompt inside
the workers (the manifest's ``times.total``: what Ray's overhead is measured against), and
the peak RSS of a worker (the manifest's ``peak_rss_mib``; for ``separate`` the attribute
command's own peak). Results go to ``benchmarks/results/batch-*.json``; record the machine
load (``uptime``) beside them: the numbers scale with it.

  PYTHONPATH=python python -m benchmarks.end_to_end.bench_batch --prompts 6 --max-feature-nodes 200
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is", "The opposite of hot is", "Two plus two equals",
    "The Eiffel Tower is in the city of", "A group of crows is called a", "Water freezes at zero degrees",
    "The largest planet in the solar system is", "Shakespeare wrote Romeo and", "The color of the sky is",
    "Cats are animals that like to", "The first president of the United States was", "Ice is frozen",
    "The chemical symbol for gold is", "Monday comes before", "A baby dog is called a",
    "The sun rises in the", "Bread is made from", "Paris is the capital of", "Bees make",
    "The Great Wall is in",
]
# --long: each prompt after this passage, 61-67 tokens in all (the 64-token case)
PREAMBLE = ("Here is a short quiz on general knowledge, of the kind a teacher might hand out at the end "
            "of a school week. It covers geography, science and history. Each question is answered with "
            "a single word or a short phrase, and the answers are checked together in class afterwards. "
            "Question: ")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cltrace.cli", *args]


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def separate(prompts, flags, out: Path) -> dict:
    t0, peaks = time.perf_counter(), []
    for p in prompts:
        proc = subprocess.run(_cli("attribute", p, "--out", str(out), "--format", "json", "--quiet", *flags),
                              capture_output=True, text=True, check=True)
        peaks.append(float(re.search(r"peak RSS ([0-9.]+) GiB", proc.stdout).group(1)) * 1024)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "prompts_per_min": 60 * len(prompts) / wall, "peak_rss_mib": max(peaks)}


def batch(prompts, flags, out: Path, workers: int, ray: bool, threads: int = 0, command: str = "batch") -> dict:
    """One ``cltrace batch`` (or ``contrast``: the prompts labelled a/b alternating) command."""
    if command == "batch":
        listing = out.with_suffix(".txt")
        listing.write_text("".join(p + "\n" for p in prompts))
    else:
        listing = out.with_suffix(".jsonl")
        listing.write_text("".join(json.dumps({"prompt": p, "label": "ab"[i % 2]}) + "\n" for i, p in enumerate(prompts)))
    t0 = time.perf_counter()
    subprocess.run(_cli(command, str(listing), "--out", str(out), "--workers", str(workers), "--quiet",
                        "--threads", str(threads), *(["--ray"] if ray else []), *flags), check=True, capture_output=True)
    wall = time.perf_counter() - t0
    records = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == len(prompts) and all(r["status"] == "ok" for r in records), records
    r = {"wall_s": wall, "prompts_per_min": 60 * len(prompts) / wall,
         "traced_s_per_prompt": sum(r["times"]["total"] for r in records) / len(records),
         "worker_load_s": max(r["load_s"] for r in records),
         "peak_rss_mib": max(r["peak_rss_mib"] for r in records),
         "workers_seen": len({r["worker"] for r in records})}
    if command == "contrast":
        r["report_s"] = json.loads((out / "contrast.json").read_text())["seconds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help="how many of the 20 prompts (default all)")
    ap.add_argument("--max-feature-nodes", type=int, default=7500)
    ap.add_argument("--modes", default="separate,local-1,local-2,ray-1,ray-2")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per batch worker (default: the command's, cores // workers)")
    ap.add_argument("--long", action="store_true", help="prefix every prompt with PREAMBLE (~64 tokens each)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/batch-<date>.json)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if len(set(modes)) < len(modes):
        ap.error("a mode given twice would resume its own folder (run the command again instead)")
    prompts = [(PREAMBLE if args.long else "") + p for p in PROMPTS[: args.prompts]]
    flags = ["--max-feature-nodes", str(args.max_feature_nodes)]
    results = {"prompts": len(prompts), "long": args.long, "max_feature_nodes": args.max_feature_nodes, "threads": args.threads,
               "cores": len(os.sched_getaffinity(0)), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            load_before = _load()
            out = Path(tmp, mode)
            if mode == "separate":
                r = separate(prompts, flags, out)
            else:
                *command, kind, n = mode.split("-")
                r = batch(prompts, flags, out, int(n), kind == "ray", args.threads, (command or ["batch"])[0])
            r["load_before"], r["load_after"] = load_before, _load()
            results["modes"][mode] = r
            print(f"{mode:9s} {r['prompts_per_min']:6.2f} prompts/min  wall {r['wall_s']:6.1f}s  "
                  f"traced {r.get('traced_s_per_prompt', float('nan')):5.2f}s/prompt  "
                  f"peak {r['peak_rss_mib']:.0f} MiB/worker  load {load_before} -> {r['load_after']}"
                  + (f"  report {r['report_s']:.2f}s" if "report_s" in r else ""), flush=True)
    path = Path(args.out or Path(__file__).parent / "results" / f"batch-{time.strftime('%Y-%m-%d-%H%M')}.json")
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
