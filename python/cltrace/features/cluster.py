"""Pass 1 of ``cltrace features --ray``: the scan of disjoint row shards on Ray actors.

What is distributed: only the scan (one forward + one encode per token, the dominant cost on a
large corpus). The rows are cut into contiguous shards of whole batches (:func:`plan_shards`,
Ray-free; about 4 per actor, so a lost actor loses little); each actor loads the model and transcoders ONCE (a
picklable ``loader``), scans whole shards into a fresh :class:`FeatureState` and returns it;
the driver merges the states as they arrive (exact and order-independent, so the result is the
single-process scan's, bit for bit). Pass 2 (the windows), the logits and the writing stay in
the driver, which has the model loaded anyway. Memory: each actor holds the model, the
transcoders and one full FeatureState of the set (``bytes_per_feature`` x features), the
driver the merged state plus the one being merged.

Resume: the merged state, with the shard plan and the shards done in its ``meta``, is saved
atomically to ``DIR/.work/state.pt`` (at most every ``every_s`` seconds, and at the end), so a
rerun after Ctrl-C or a crash scans only the missing shards. A dead actor's shard goes back to
the queue and to a replacement actor (:func:`cltrace.ray_pool.dispatch`).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .scan import layer_encoders, scan, scan_bar, tokens_per_row
from .state import FeatureState

SHARDS_PER_ACTOR = 4


def plan_shards(n_rows: int, n_shards: int, batch_rows: int = 1) -> list[tuple[int, int]]:
    """Contiguous, disjoint ``[start, stop)`` row blocks covering ``0..n_rows``, each a whole
    number of the single-process scan's batches of ``batch_rows`` rows (the last batch may be
    short), their numbers of batches within 1 of each other; at most ``n_shards``, never empty.

    Aligned to the batches so that every forward pass on an actor runs the same rows as the
    single-process scan: a float32 forward is not bitwise invariant to the batch's shape (BLAS
    blocking), and the pages' activations must be the same bits."""
    n_batches = -(-n_rows // batch_rows)
    n = max(1, min(n_shards, n_batches))
    cuts = [min(n_rows, (i * n_batches // n) * batch_rows) for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class ScanWorker:
    """One actor: the model and the encoders of ``layers`` loaded once by ``loader() ->
    (model, transcoders)``; ``scan(start, stop)`` -> the FeatureState of rows start..stop."""

    def __init__(self, loader: Callable[[], tuple], rows: Tensor, layers: Sequence[int],
                 settings: dict, threads: int = 0):
        if threads > 0:
            torch.set_num_threads(threads)
        self.model, ts = loader()
        self.encoders = layer_encoders(ts, layers)
        self.site = ts.site_in
        self.d_sae = {L: ts.layers[L].d_sae for L in layers}
        self.rows = rows  # [n_rows, ctx]
        self.settings = settings

    def scan(self, start: int, stop: int) -> FeatureState:
        s = self.settings
        state = FeatureState.empty(self.d_sae, self.rows.shape[1], s["top_k"], s["n_samples"], s["seed"])
        scan(self.model, self.rows, self.encoders, state, bos=s["bos"],
             row_ids=torch.arange(start, stop), batch_rows=s["batch_rows"], bar=False,
             site=self.site)
        state.meta = {}
        return state


def scan_ray(loader, rows: Tensor, layers: Sequence[int], state: FeatureState, *,
             bos: Optional[int], batch_rows: int, address=None, workers: Optional[int] = None,
             checkpoint: Optional[Callable[[FeatureState], None]] = None, every_s: float = 60.0,
             threads: int = 0, bar: bool = True,
             say: Callable[..., None] = lambda *a: None) -> list[int]:
    """Fold every row of ``rows [n_rows, ctx]`` into ``state`` (empty, or a resumed state of an
    earlier ``scan_ray``) on ``workers`` actors (None: one per GPU, else one per 4 CPUs) of the
    Ray cluster at ``address`` (None: a local one), ``threads`` torch threads each (0: the
    cluster's CPUs split between the actors). Returns the indices of the shards scanned by this
    call (the others were done before).

    Bits: the state equals the single-process scan's when each actor runs as many torch
    threads as that process did (on the same kind of CPU): a float32 forward of some batch
    shapes is not bitwise invariant to the thread count (measured: the 270M's 1-row batch,
    ulp-level differences between 1 and 2 threads)."""
    from ..ray_pool import actor_options, dispatch, session

    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers} with --ray: give at least 1 actor (or leave it out)")
    if state.meta.get("next_batch") and "shards" not in state.meta:
        raise ValueError("the interrupted scan in --out ran without --ray; rerun without --ray "
                         "to resume it (or remove the folder)")
    with session(address) as ray:
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        n = workers or (gpus if gpus else max(1, cpus // 4))
        threads = threads or (1 if gpus else max(1, cpus // n))
        if "shards" not in state.meta:  # a new scan: the plan is kept, a rerun may have other --workers
            state.meta.update(shards=plan_shards(rows.shape[0], SHARDS_PER_ACTOR * n, batch_rows),
                              done_shards=[])
        shards = [tuple(s) for s in state.meta["shards"]]
        done = set(state.meta["done_shards"])
        todo = [i for i in range(len(shards)) if i not in done]
        if done:
            say(f"resuming the scan: {len(done)} of {len(shards)} shards done")
        if not todo:
            return []
        settings = dict(bos=bos, batch_rows=batch_rows, top_k=state.top_k,
                        n_samples=state.n_samples, seed=state.seed)
        per_row = tokens_per_row(rows, bos)
        pbar = scan_bar(int(per_row.sum()), sum(int(per_row[slice(*shards[i])].sum()) for i in done), bar,
                        desc="feature scan (Ray)")
        # the CPUs asked of Ray: never more than an n-th of the cluster's, or actors would wait
        # for each other (the torch threads may still oversubscribe, when asked for)
        Actor = ray.remote(ScanWorker).options(**actor_options(threads, gpus > 0, n, cpus))
        rows_ref = ray.put(rows)
        last, merging = time.monotonic(), False

        def collect(i, shard_state: FeatureState) -> None:
            nonlocal last, merging
            merging = True  # a Ctrl-C in here leaves a half-merged state: not saved
            state.merge(shard_state)
            state.meta["done_shards"] = sorted(state.meta["done_shards"] + [i])
            merging = False
            pbar.update(shard_state.n_tokens)
            if checkpoint is not None and time.monotonic() - last >= every_s:
                checkpoint(state)
                last = time.monotonic()

        say(f"scanning {len(todo)} shards on {min(n, len(todo))} Ray actors ({threads} threads each)")
        try:
            dispatch(ray, lambda: Actor.remote(loader, rows_ref, list(layers), settings, threads),
                     min(n, len(todo)), todo, submit=lambda actor, i: actor.scan.remote(*shards[i]),
                     collect=collect, describe=lambda i: f"rows {shards[i][0]}-{shards[i][1] - 1}")
        finally:
            pbar.close()
            if checkpoint is not None and not merging:  # also on Ctrl-C or lost actors: resume
                checkpoint(state)
    return todo

