"""The causal test of a prompt set on a Ray cluster: N actors each load the model once (a
picklable ``loader``, as ``cltrace batch`` workers do), the prompts are dealt out one at a
time to whichever actor is free (:func:`cltrace.ray_pool.dispatch`: an actor that dies is
replaced and its prompt measured again), and the rows are put back in prompt order. Each
actor runs :func:`~cltrace.steering.prompt_set.measure_prompt`, the local loop's own code, so
the rows equal :func:`~cltrace.steering.prompt_set.run_set`'s (bit for bit when each actor
runs as many torch threads as the local process: a float32 forward is not always bitwise
invariant to the thread count). ``ray`` is imported only through :mod:`cltrace.ray_pool`."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..errors import UsageError
from .interventions import Intervention
from .metrics import Metric, metric_ids
from .prompt_set import SetResult, SetRow, measure_prompt, summarize


class SetWorker:
    """One model (``loader() -> (model, tokenizer, ...)``: a ReplacementModel or SaeSteering
    first), then one prompt's :class:`SetRow` per call."""

    def __init__(self, loader: Callable[[], tuple], threads: int = 0):
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.rm, self.tokenizer, *_ = loader()

    def measure(self, spec, metric: Metric, interventions: Sequence[Intervention], opts: dict):
        """The prompt's SetRow, or ("error", message) for a UsageError (a bad prompt or metric:
        the coordinator raises it, one line, not a Ray traceback)."""
        try:
            ids = metric_ids(metric, self.tokenizer)
            return measure_prompt(self.rm, self.tokenizer, spec, metric, ids, interventions, **opts)
        except UsageError as e:
            return ("error", str(e))


def run_set_ray(loader: Callable[[], tuple], specs, metric: Metric,
                interventions: Sequence[Intervention], **kw) -> SetResult:
    """:func:`~cltrace.steering.prompt_set.run_set` on Ray actors (``kw``: those of
    :func:`run_sets_ray`)."""
    return run_sets_ray(loader, [specs], metric, interventions, **kw)[0]


def run_sets_ray(loader: Callable[[], tuple], sets: Sequence[Sequence], metric: Metric,
                 interventions: Sequence[Intervention], *, address=None,
                 workers: Optional[int] = None, threads: int = 0, mode: str = "free",
                 freeze_features: bool = False, steer_generated: bool = False,
                 generation: Optional[dict] = None, n_resamples: int = 10_000, seed: int = 0,
                 say: Callable[..., None] = lambda *a: None) -> list[SetResult]:
    """One :class:`~cltrace.steering.prompt_set.SetResult` per set of prompts (each as
    :func:`~cltrace.steering.prompt_set.run_set` gives it), measured by ``workers`` Ray actors
    (None: one per GPU, else one per CPU of the cluster at ``address``, True or None: a new
    local cluster) with ``threads`` torch threads each (0: the cluster's CPUs split between
    them). The actors load the model once for all the sets."""
    from ..ray_pool import actor_options, dispatch, session

    if not sets or not all(sets):
        raise UsageError("the prompt set is empty")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers} with --ray: give at least 1 actor (or leave it out)")
    opts = dict(mode=mode, freeze_features=freeze_features, steer_generated=steer_generated,
                generation=generation)
    items = [(s, i) for s, specs in enumerate(sets) for i in range(len(specs))]
    rows: list[list[Optional[SetRow]]] = [[None] * len(specs) for specs in sets]
    errors: list[tuple[tuple[int, int], str]] = []
    done = 0

    def collect(item: tuple[int, int], out) -> None:
        nonlocal done
        s, i = item
        if isinstance(out, tuple):  # ("error", message)
            errors.append((item, out[1]))
            return
        rows[s][i] = out
        done += 1
        say(f"[{done}/{len(items)}] {sets[s][i].slug}")

    with session(None if address is True else address) as ray:
        res = ray.cluster_resources()
        gpu = res.get("GPU", 0) >= 1
        cpus = res.get("CPU", 1)
        n = min(workers or (int(res["GPU"]) if gpu else max(1, int(cpus))), len(items))
        threads = threads or (1 if gpu else max(1, int(cpus // n)))
        say(f"measuring {len(items)} prompts on {n} Ray actors ({threads} threads each)")
        Actor = ray.remote(SetWorker).options(**actor_options(threads, gpu, n, cpus))
        ivs = list(interventions)
        dispatch(ray, lambda: Actor.remote(loader, threads), n, items,
                 submit=lambda actor, it: actor.measure.remote(sets[it[0]][it[1]], metric, ivs, opts),
                 collect=collect, describe=lambda it: repr(sets[it[0]][it[1]].slug))
    if errors:
        raise UsageError(min(errors)[1])  # the first bad prompt in set order, as the local loop
    return [summarize(metric, r, interventions, mode, n_resamples=n_resamples, seed=seed) for r in rows]
