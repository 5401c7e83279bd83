"""Warm start of ``cltrace.load_model``: fresh processes, median of ``--repeat``.

Each run is its own Python process (``import cltrace`` then ``load_model(name)`` on the CPU,
float32, the cached safetensors copy in the page cache) timed with ``time.perf_counter``; it
also says whether transformers' modeling stack was imported. Usage:

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_load [--repeat 3] [--name gemma-3-270m]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import cltrace
t1 = time.perf_counter()
lm = cltrace.load_model(sys.argv[1], device="cpu", dtype="float32")
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1,
                  "modeling_imported": "transformers.modeling_utils" in sys.modules,
                  "transformers_imported": "transformers" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--name", default="gemma-3-270m")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, args.name], check=True,
                             capture_output=True, text=True, env=os.environ.copy())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    print(json.dumps({"median_import_s": statistics.median(r["import"] for r in runs),
                      "median_load_s": statistics.median(r["load"] for r in runs),
                      "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
