"""Scan throughput (pass 1 of ``cltrace features``) on Gemma 3 270M + the starter set (all 18
layers of 2048 PLTs), in one process against ``--ray`` with 1 and 2 actors on a local Ray
cluster of ``--cpus`` CPUs, over ``--tokens`` tokens of the stdlib docstrings (rows of 128).

Per configuration: the wall time of the whole scan call (for Ray: actor start, model + set
load in each actor, the shards, the merge in the driver) and the tokens/s it gives; for Ray
also the time of one actor's load (measured once in this process, the same loader). The merged
Ray states are checked equal (every tensor) to the single-process state made with the actors'
torch thread count (a 1-row batch of the 270M differs at the ulp level between 1 and 2
threads, so that is the reference that must match bit for bit). The machine is
shared: ``uptime``'s load average is recorded before and after each run.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_features_ray [--tokens 8192] [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import time
from pathlib import Path


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray
    import torch

    from cltrace.commands.features import load_for_scan
    from cltrace.features.cluster import scan_ray
    from cltrace.features.scan import layer_encoders, scan
    from cltrace.features.state import FeatureState
    from cltrace.models import load_model
    from cltrace.training.corpus import stdlib_texts, token_rows
    from cltrace.training.starter import starter_transcoders

    loaded = load_model("gemma-3-270m")
    ts = starter_transcoders(loaded, progress=lambda *a: None, bar=False)
    layers = sorted(ts.layers)
    bos = loaded.tokenizer.bos_token_id
    rows = token_rows(loaded.tokenizer, stdlib_texts(), args.ctx, max_tokens=args.tokens)
    per_row = (rows != bos).sum(1).cumsum(0)
    rows = rows[:int((per_row < args.tokens).sum()) + 1]
    d_sae = {L: ts.layers[L].d_sae for L in layers}
    n_tok = int((rows != bos).sum())
    loader = functools.partial(load_for_scan, "gemma-3-270m", None, None, None)
    t0 = time.perf_counter()
    loader()
    load_s = time.perf_counter() - t0
    res = {"tokens": n_tok, "rows": list(rows.shape), "layers": len(layers), "d_sae": ts.d_sae,
           "batch_rows": args.batch_rows, "torch_threads": torch.get_num_threads(),
           "actor_load_s": load_s, "runs": []}

    def record(name, seconds, before, **kw):
        r = {"config": name, "seconds": seconds, "tokens_per_s": n_tok / seconds,
             "uptime_before": before, "uptime_after": uptime(), **kw}
        res["runs"].append(r)
        print(json.dumps(r), flush=True)

    refs = {}  # torch threads -> the single-process state
    for t in sorted({max(1, args.cpus // int(n)) for n in args.actors.split(",")}, reverse=True):
        torch.set_num_threads(t)
        before = uptime()
        ref = FeatureState.empty(d_sae, args.ctx)
        t0 = time.perf_counter()
        scan(loaded.model, rows, layer_encoders(ts, layers), ref, bos=bos, batch_rows=args.batch_rows, bar=False)
        record(f"single process, {t} thread{'s' if t > 1 else ''}", time.perf_counter() - t0, before, threads=t)
        refs[t] = ref.tensors(), ref.n_tokens

    import cltrace

    root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=args.cpus, log_to_driver=False, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}})
    try:
        for n in map(int, args.actors.split(",")):
            before = uptime()
            state = FeatureState.empty(d_sae, args.ctx)
            t0 = time.perf_counter()
            shards = scan_ray(loader, rows, layers, state, bos=bos, batch_rows=args.batch_rows,
                              workers=n, bar=False)
            sec = time.perf_counter() - t0
            got, t = state.tensors(), max(1, args.cpus // n)
            want, n_want = refs[t]
            same = all(torch.equal(want[k], got[k]) for k in want) and state.n_tokens == n_want
            record(f"ray, {n} actor{'s' if n > 1 else ''}", sec, before, shards=len(shards),
                   threads_per_actor=t, equal_to_single_process_same_threads=same,
                   tokens_per_s_excluding_one_load=n_tok / max(1e-9, sec - load_s))
    finally:
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
