"""The Ray plumbing shared by ``cltrace batch --ray`` and ``cltrace features --ray``: connect
to (or start) a cluster, and run a queue of independent work items on N actors, one item in
flight per actor; the item of an actor that dies (a crash, a pre-empted node) goes back to the
front of the queue and a replacement actor is started (at most 2N replacements, then the run
stops: a rerun resumes). ``ray`` is imported only through :func:`import_ray`."""
from __future__ import annotations

import math
import os
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator
from .errors import UsageError


def import_ray():
    """The ``ray`` module, or a one-line ValueError (exit 2 in the CLI) saying how to get it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'cltrace[ray]'") from None
    return ray


@contextmanager
def session(address) -> Iterator[Any]:
    """Yield ``ray``, connected to ``address`` (None: a new local cluster) unless this process
    already is; a cluster started here is shut down on exit."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        # an uninstalled checkout (PYTHONPATH) reaches the actors of a local cluster too
        env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
        ray.init(address=address, log_to_driver=False, runtime_env=env)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def actor_options(threads: int, gpu: bool, n: int = 1, cpus: float = float("inf")) -> dict:
    """The resources one of ``n`` actors asks of a cluster with ``cpus`` CPUs: ``threads`` CPUs,
    but never more than an n-th of the cluster's (fractional when needed), or some actors would
    wait for CPUs that the others hold until the end: a hang. No restarts by Ray itself: a lost
    actor is replaced by :func:`dispatch`."""
    num_cpus = math.floor(min(float(threads), cpus / max(1, n)) * 1e4) / 1e4  # Ray's precision, rounded down
    return {"num_cpus": num_cpus, "num_gpus": 1 if gpu else 0, "max_restarts": 0,
            "max_task_retries": 0}


def dispatch(ray, new_actor: Callable[[], Any], n: int, items: Iterable,
             submit: Callable[[Any, Any], Any], collect: Callable[[Any, Any], None],
             describe: Callable[[Any], str] = repr) -> None:
    """Run every item on ``n`` actors made by ``new_actor()``: ``submit(actor, item)`` -> an
    ObjectRef, ``collect(item, result)`` in this process as results arrive (any order). An
    exception raised by the task itself propagates; the actors are killed on exit."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    queue = deque(items)
    actors = [new_actor() for _ in range(n)]
    inflight = {}  # ref -> (actor, item)
    replaced = 0

    def feed(actor) -> None:
        if queue:
            item = queue.popleft()
            inflight[submit(actor, item)] = (actor, item)

    for actor in actors:
        feed(actor)
    try:
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, item = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                replaced += 1
                if replaced > 2 * n:
                    raise RuntimeError(f"Ray actors keep dying ({replaced} lost, last on "
                                       f"{describe(item)}: {type(e).__name__}); rerun to resume") from None
                queue.appendleft(item)  # not the item's fault
                ray.kill(actor)
                actor = new_actor()
                actors.append(actor)
                feed(actor)
                continue
            collect(item, out)
            feed(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
