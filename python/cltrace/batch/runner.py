"""Run a batch: plan what is left (resume), dispatch it to workers, record every result.

``run_batch`` traces each prompt of a list once: prompts recorded ``ok`` in the manifest are
skipped, ``failed`` ones are retried once (``MAX_ATTEMPTS`` in all). The coordinator (this
process) alone writes the output folder: each prompt's files, then its manifest line, then,
at the end or on Ctrl-C, ``graph-metadata.json`` listing every graph of the folder. Workers
are in-process (``workers=0``), local processes (:mod:`.local`) or Ray actors (:mod:`.cluster`).
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..pipeline import PromptSpec, TraceSettings
from .store import Store
from .worker import Loader, Worker
from ..errors import UsageError

MAX_ATTEMPTS = 2  # a failed prompt is retried once, on the next run
WORKER_GIB = 3.0  # memory one worker of Gemma 3 270M needs at most (benchmarks/end_to_end/bench_batch.py)


@dataclass
class BatchResult:
    """What one run did: counts, the records it wrote, its wall time."""

    total: int  # prompts in the list
    skipped: int  # already done, or failed MAX_ATTEMPTS times before
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    records: list = field(default_factory=list)


def plan(specs: Sequence[PromptSpec], store: Store) -> list[tuple[PromptSpec, int]]:
    """(prompt, attempt number) of each prompt still to trace, in list order."""
    done, failures = set(), {}
    for r in store.records():
        if r.get("status") == "ok":
            done.add(r["slug"])
        else:
            failures[r["slug"]] = failures.get(r["slug"], 0) + 1
    return [(s, failures.get(s.slug, 0) + 1) for s in specs
            if s.slug not in done and failures.get(s.slug, 0) < MAX_ATTEMPTS]


def default_workers(worker_gib: float = WORKER_GIB) -> int:
    """As many workers as cores, and as 80 % of the available memory holds."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, int(0.8 * avail / (worker_gib * 2**30))))


class Collector:
    """Writes each result as it arrives and keeps the progress bar."""

    def __init__(self, store: Store, result: BatchResult, n: int, progress: bool):
        from tqdm.auto import tqdm

        self.store, self.result, self.seen = store, result, set()
        self.pages_written: set = set()  # features/{c}.json put by this run (the same bytes each time)
        self.bar = tqdm(total=n, unit="prompt", disable=not progress, dynamic_ncols=True,
                        desc="tracing", smoothing=0.1)

    def __call__(self, out: dict) -> None:
        record = out["record"]
        if record["slug"] in self.seen:  # a result delivered twice (a retried task): keep one
            return
        self.seen.add(record["slug"])
        for name, data in out["files"].items():  # the files first: an ok line means they exist
            if name.startswith("features/"):
                if name in self.pages_written:
                    continue
                self.pages_written.add(name)
            self.store.put(name, data)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.store.append_record(record)
        self.result.records.append(record)
        if record["status"] == "ok":
            self.result.ok += 1
        else:
            self.result.failed += 1
            self.bar.write(f"failed: {record['slug']}: {record['error']}", file=sys.stderr)
        self.bar.set_postfix(ok=self.result.ok, failed=self.result.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def write_graph_index(store: Store) -> int:
    """Rewrite ``graph-metadata.json``: the graphs already listed there, with the metadata of
    every ``ok`` manifest record (the last one per slug) added or replaced; returns the count."""
    raw = store.get("graph-metadata.json")
    graphs = {}
    if raw:
        try:
            graphs = {g.get("slug"): g for g in json.loads(raw).get("graphs", [])}
        except json.JSONDecodeError as e:
            raise UsageError(f"{store.location}/graph-metadata.json is not valid JSON ({e}); "
                             "move it away to start a new index") from None
    for r in store.records():
        if r.get("status") == "ok" and r.get("metadata"):
            graphs[r["slug"]] = r["metadata"]
    ordered = sorted(graphs.values(), key=lambda g: g.get("slug", ""))
    store.put("graph-metadata.json",
              (json.dumps({"graphs": ordered}, indent=1, allow_nan=False) + "\n").encode())
    return len(ordered)


def run_batch(specs: Sequence[PromptSpec], out: str | os.PathLike | Store, settings: TraceSettings,
              loader: Loader, *, workers: Optional[int] = None, ray: Optional[str | bool] = None,
              threads: int = 0, progress: bool = True) -> BatchResult:
    """Trace every prompt of ``specs`` not yet done in ``out`` (a folder or fsspec URL).

    ``workers``: 0 in this process, N local worker processes (None: :func:`default_workers`),
    or with ``ray`` (True: a local Ray cluster, or an address) N actors (None: one per CPU or
    GPU of the cluster). ``threads``: torch threads per worker (0: the cores split evenly)."""
    settings.check()
    store = out if isinstance(out, Store) else Store(out)
    store.check_writable()
    slugs = [s.slug for s in specs]
    if len(set(slugs)) != len(slugs):
        raise UsageError("two prompts have the same slug")
    todo = plan(specs, store)
    result = BatchResult(total=len(specs), skipped=len(specs) - len(todo))
    t0 = time.perf_counter()
    collect = Collector(store, result, len(todo), progress)
    try:
        if not todo:
            pass
        elif ray:
            from .cluster import run_ray

            run_ray(todo, workers, None if ray is True else ray, loader, settings, threads, collect)
        elif workers == 0:
            worker = Worker(loader, settings, threads)
            for spec, attempt in todo:
                collect(worker.trace(spec, attempt))
        else:
            from .local import run_local

            n = min(workers or default_workers(), len(todo))
            run_local(todo, n, loader, settings, threads, collect)
    finally:
        collect.close()
        write_graph_index(store)
        result.seconds = time.perf_counter() - t0
    return result
