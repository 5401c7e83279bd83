"""The embedded model's tokenizer at start-up: ``load_model``'s tokenizer part
(``models.load._cached_tokenizer`` on the warm cache, torch and transformers already imported as
``load_model`` has them), then the first encode of a 64-token prompt and of a 20,000-character
text, each in a fresh process; the median of ``--repeat`` processes is printed per figure.

  PYTHONPATH=python python -m benchmarks.end_to_end.bench_tokenizer --repeat 3

Run it once with another checkout's ``python`` on PYTHONPATH for the before figures; record the
machine load (``uptime``) beside them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, time
import torch, transformers
from transformers import BatchEncoding, PreTrainedTokenizerFast
from cltrace.models.load import _cached_tokenizer, embedded_model_dir
from cltrace.training.corpus import stdlib_texts

folder = embedded_model_dir()
texts = stdlib_texts()
prompt = texts[3][:290]  # 64 tokens with <bos>
big = "\n\n".join(texts)[:20000]
t0 = time.perf_counter()
tok = _cached_tokenizer(folder)
t1 = time.perf_counter()
n64 = tok(prompt, return_tensors="pt")["input_ids"].shape[1]
t2 = time.perf_counter()
n20k = len(tok(big)["input_ids"])
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "encode_64": t2 - t1, "encode_20k": t3 - t2, "n64": n64,
                  "n20k": n20k, "class": type(tok).__name__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = [json.loads(subprocess.run([sys.executable, "-c", CHILD], check=True, text=True,
                                      capture_output=True).stdout.splitlines()[-1])
            for _ in range(args.repeat)]
    for r in runs:
        print(json.dumps(r))
    med = {k: statistics.median(r[k] for r in runs) for k in ("load", "encode_64", "encode_20k")}
    print(json.dumps({"median": med, "class": runs[0]["class"], "n64": runs[0]["n64"],
                      "n20k": runs[0]["n20k"]}))


if __name__ == "__main__":
    main()
