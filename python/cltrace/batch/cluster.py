"""The batch on a Ray cluster: one actor per GPU (or per CPU slot) holds a Worker (the model
loaded once); prompts are sent one at a time to whichever actor is free. A prompt whose actor
dies (a crash, a pre-empted node) goes back to the queue and to another actor, which replaces
the dead one (:func:`cltrace.ray_pool.dispatch`); ``ray`` is imported only there."""
from __future__ import annotations

from ..ray_pool import actor_options, dispatch, session
from .worker import Worker
from ..errors import UsageError


def run_ray(todo, n, address, loader, settings, threads: int, collect) -> None:
    """Trace ``todo`` [(spec, attempt)] on ``n`` actors (None: one per GPU, else one per
    ``threads`` CPUs; ``threads`` 0 with ``n`` given: the cluster's CPUs split between the
    actors), ``collect`` each result in this process."""
    if n is not None and n < 1:
        raise UsageError(f"--workers {n} with --ray: give at least 1 actor (or leave it out)")
    with session(address) as ray:
        resources = ray.cluster_resources()
        gpu = resources.get("GPU", 0) >= 1
        cpus = resources.get("CPU", 1)
        if n is None:  # one actor per GPU, else one per CPU slot of --threads (default 1) CPUs
            threads = threads or 1
            n = int(resources["GPU"]) if gpu else max(1, int(cpus // threads))
        elif not threads:  # N actors: the cluster's CPUs split between them, as local workers do
            threads = max(1, int(cpus // n)) if not gpu else 1
        n = min(n, len(todo))
        Actor = ray.remote(Worker).options(**actor_options(threads, gpu, n, cpus))
        # a lost actor's prompt is retraced with the same attempt number: not the prompt's fault
        dispatch(ray, lambda: Actor.remote(loader, settings, threads), n, todo,
                 submit=lambda actor, item: actor.trace.remote(*item),
                 collect=lambda item, out: collect(out), describe=lambda item: repr(item[0].slug))
