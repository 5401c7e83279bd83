"""Local worker processes (multiprocessing, spawn): each loads the model once, then traces
the prompts it is handed. A worker that dies takes its prompt with it: the pool is started
again once for what is left, then the run stops (a rerun resumes)."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from .worker import Worker

_WORKER = None  # this process's Worker
RESTARTS = 1


def _init(loader, settings, threads) -> None:
    global _WORKER
    _WORKER = Worker(loader, settings, threads)


def _trace(spec, attempt) -> dict:
    return _WORKER.trace(spec, attempt)


def _stop(ex: ProcessPoolExecutor) -> None:
    """Stop now: cancel what has not started and end the workers (their temp files go too)."""
    ex.shutdown(wait=False, cancel_futures=True)
    for p in list(getattr(ex, "_processes", {}).values()):
        p.terminate()


def run_local(todo, n: int, loader, settings, threads: int, collect) -> None:
    """Trace ``todo`` [(spec, attempt)] on ``n`` processes, ``collect`` each result."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or max(1, cores // n)
    left = list(todo)
    for round_ in range(RESTARTS + 1):
        ex = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init, initargs=(loader, settings, threads))
        futures = {ex.submit(_trace, spec, attempt): (spec, attempt) for spec, attempt in left}
        broken = []
        try:
            for f in as_completed(futures):
                try:
                    out = f.result()
                except BrokenProcessPool:
                    broken.append(futures[f])
                    continue
                collect(out)
        except BaseException:
            _stop(ex)
            raise
        ex.shutdown(wait=True)
        if not broken:
            return
        left = broken
    raise RuntimeError(f"a worker process died twice ({len(left)} prompts not traced, e.g. "
                       f"{left[0][0].slug!r}); rerun the same command to resume")
