"""The batch on a Ray cluster: one actor per GPU (or per CPU slot) holds a Worker (the model
loaded once); prompts are sent one at a time to whichever actor is free. A prompt whose actor
dies (a crash, a pre-empted node) goes back to the queue and to another actor, which replaces
the dead one; ``ray`` is imported only here."""
from __future__ import annotations

import os
from collections import deque

from .worker import Worker


def _actor_options(threads: int, gpu: bool) -> dict:
    return {"num_cpus": threads, "num_gpus": 1 if gpu else 0, "max_restarts": 0,
            "max_task_retries": 0}


def run_ray(todo, n, address, loader, settings, threads: int, collect) -> None:
    """Trace ``todo`` [(spec, attempt)] on ``n`` actors (None: one per GPU, else one per
    ``threads`` CPUs), ``collect`` each result in this process."""
    if n is not None and n < 1:
        raise ValueError(f"--workers {n} with --ray: give at least 1 actor (or leave it out)")
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'cltrace[ray]'") from None
    started = not ray.is_initialized()
    if started:
        # an uninstalled checkout (PYTHONPATH) reaches the actors of a local cluster too
        env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
        ray.init(address=address, log_to_driver=False, runtime_env=env)
    try:
        resources = ray.cluster_resources()
        gpu = resources.get("GPU", 0) >= 1
        threads = threads or 1
        if n is None:
            n = int(resources["GPU"]) if gpu else max(1, int(resources.get("CPU", 1) // threads))
        n = min(n, len(todo))
        Actor = ray.remote(Worker).options(**_actor_options(threads, gpu))
        _dispatch(ray, Actor, n, deque(todo), loader, settings, threads, collect)
    finally:
        if started:
            ray.shutdown()


def _dispatch(ray, Actor, n, queue, loader, settings, threads, collect) -> None:
    from ray.exceptions import RayActorError, WorkerCrashedError

    actors = [Actor.remote(loader, settings, threads) for _ in range(n)]
    inflight = {}  # ref -> (actor, spec, attempt)
    replaced = 0

    def feed(actor) -> None:
        if queue:
            spec, attempt = queue.popleft()
            inflight[actor.trace.remote(spec, attempt)] = (actor, spec, attempt)

    for actor in actors:
        feed(actor)
    try:
        while inflight:
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, spec, attempt = inflight.pop(ref)
            try:
                out = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                replaced += 1
                if replaced > 2 * n:
                    raise RuntimeError(f"Ray actors keep dying ({replaced} lost, last on "
                                       f"{spec.slug!r}: {type(e).__name__}); rerun to resume") from None
                queue.appendleft((spec, attempt))  # not the prompt's fault: same attempt
                ray.kill(actor)
                actor = Actor.remote(loader, settings, threads)
                actors.append(actor)
                feed(actor)
                continue
            collect(out)
            feed(actor)
    finally:
        for actor in actors:
            ray.kill(actor)
