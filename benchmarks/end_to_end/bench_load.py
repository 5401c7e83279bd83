"""Warm start of ``cltrace.load_model``: fresh processes, median of ``--repeat``.

Each run is its own Python process on the CPU, float32, the cached safetensors copy of the
embedded Gemma 3 270M in the page cache, timed with ``time.perf_counter``. ``--part``:

* ``load_model`` (default): ``import torch``, ``import cltrace``, then ``cltrace.load_model``
  (model + tokenizer); also says whether transformers' modeling stack was imported;
* ``model``: cltrace's model alone (``gemma3_load.load_gemma3`` of the cached copy);
* ``hf-model``: what ``load_model`` did before: ``import transformers`` and
  ``AutoModelForCausalLM.from_pretrained`` of the same copy;
* ``tokenizer``: the cached copy's tokenizer alone (``load._cached_tokenizer``).

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_load [--part model] [--repeat 3]
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
part = sys.argv[1]
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import cltrace
from cltrace.models import load
t2 = time.perf_counter()
if part == "load_model":
    cltrace.load_model("gemma-3-270m", device="cpu", dtype="float32")
elif part == "model":
    from cltrace.models.gemma3_load import load_gemma3
    load_gemma3(load.embedded_model_dir(), torch.float32)
elif part == "hf-model":
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(load.embedded_model_dir(), dtype=torch.float32)
elif part == "tokenizer":
    load._cached_tokenizer(load.embedded_model_dir())
t3 = time.perf_counter()
print(json.dumps({"torch": t1 - t0, "cltrace": t2 - t1, part: t3 - t2,
                  "modeling_imported": "transformers.modeling_utils" in sys.modules,
                  "transformers_imported": "transformers" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", default="load_model", choices=["load_model", "model", "hf-model",
                                                             "tokenizer"])
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, "-c", CHILD, args.part], check=True,
                             capture_output=True, text=True, env=os.environ.copy())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in ("torch", "cltrace", args.part)}
    print(json.dumps({"part": args.part, "median_s": med, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
