"""The report of ``cltrace contrast`` at scale: built from N stored graphs, against the cost of
tracing them.

Takes a traced contrast folder (``--graphs``, e.g. the README's 8 vs 8 prompts on the 270M) and
makes a folder of ``--prompts`` N prompts from it: each prompt's graph a hard link to one of the
source set's graphs (the same bytes, so JSON parsing costs what real graphs of that model and
those thresholds cost), its manifest record a copy with the new slug, half the prompts in each
set. Times :func:`cltrace.contrast.build_report` there (reading the manifest, parsing every
graph twice: once for the feature table, once for the common circuits; the statistics;
writing), and the permutation test alone on the resulting table. The tracing cost per prompt is
the source manifest's median ``times.total`` (what ``cltrace batch`` spends per prompt; the
contrast adds only the report). Repeated graphs make the tests degenerate-looking but not
cheaper: the table has the same width as with distinct graphs of the source's features.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_contrast --graphs runs/opp-syn --prompts 1000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from cltrace.contrast import ContrastSettings, build_report


def scaled_folder(src: Path, dst: Path, n: int) -> None:
    sets = json.loads((src / "contrast-sets.json").read_text())["sets"]
    records = {}
    for line in (src / "manifest.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["slug"]] = r
    out_sets, lines = [], []
    for k, s in enumerate(sets):
        slugs = [x for x in s["slugs"] if records.get(x, {}).get("status") == "ok"]
        new = []
        for i in range(n // 2):
            old = slugs[i % len(slugs)]
            slug = f"{s['name']}-p{i}"
            os.link(src / f"{old}.json", dst / f"{slug}.json")
            lines.append(json.dumps({**records[old], "slug": slug}))
            new.append(slug)
        out_sets.append({"name": s["name"], "slugs": new})
    (dst / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (dst / "contrast-sets.json").write_text(json.dumps({"format": "cltrace.contrast-sets/1", "sets": out_sets}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--graphs", required=True, help="a traced cltrace contrast folder")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=10000)
    args = ap.parse_args()
    src = Path(args.graphs)
    trace = [json.loads(l)["times"]["total"] for l in (src / "manifest.jsonl").read_text().splitlines()]
    size = statistics.median((src / f"{json.loads(l)['slug']}.json").stat().st_size
                             for l in (src / "manifest.jsonl").read_text().splitlines())
    with tempfile.TemporaryDirectory(dir=src.parent) as tmp:
        dst = Path(tmp)
        scaled_folder(src, dst, args.prompts)
        from cltrace.batch.store import Store

        t0 = time.perf_counter()
        report = build_report(Store(dst), ContrastSettings(n_perm=args.permutations))
        total = time.perf_counter() - t0
    print(json.dumps({"prompts": args.prompts, "graph_bytes_median": size,
                      "features": report["n_features"], "tested": report["n_tested"],
                      "report_s": round(total, 2), "report_ms_per_prompt": round(1000 * total / args.prompts, 1),
                      "trace_s_per_prompt_median": round(statistics.median(trace), 1),
                      "load": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
