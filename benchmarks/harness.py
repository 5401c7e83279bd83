"""Measurement helpers for the kernel benchmarks: timing, peak memory, machine roofline.

Timing: every implementation of a case runs on the same inputs in the same process, and
the implementations alternate call by call (ours, base1, base2, ours, ...), so a burst of
load from another process hits them all alike; each reports the median of its calls.

Peak memory:
- CPU: Linux's peak resident set size (``VmHWM`` in ``/proc/self/status``) is reset before
  each measured call by writing ``5`` to ``/proc/self/clear_refs``; before the reset, freed
  heap memory is handed back with ``malloc_trim(0)``, and glibc's mmap threshold is fixed
  at 128 KiB (``mallopt``, after the timings, which run with the default allocator) so every
  large tensor is its own mapping, returned to the OS when freed. Peak = VmHWM after the call - VmRSS before it: the memory the call (and
  the implementation's own input representation, see ``_cases``) added on top of the
  shared inputs, output included. Each case runs in a fresh worker process.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the call.
"""
from __future__ import annotations

import ctypes
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_LIBC = None


def peak_rss_mib() -> float:
    """This process's own peak resident set size so far (``VmHWM``; ``ru_maxrss`` would include
    the parent's RSS before exec), MiB: the whole-process figure of the end-to-end runs."""
    return _status_kb("VmHWM") / 1024


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL("libc.so.6")
    return _LIBC


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def fix_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Make glibc serve every allocation >= nbytes by mmap (freed -> unmapped at once)."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _libc().mallopt(M_MMAP_THRESHOLD, nbytes)
    _libc().mallopt(M_TRIM_THRESHOLD, nbytes)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Extra memory (bytes) at the peak of ``fn()``, its result included (see module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    fix_mmap_threshold()
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    out = fn()
    peak = _status_kb("VmHWM") - base
    del out
    gc.collect()
    _libc().malloc_trim(0)
    return max(peak, 0) * 1024


def peak_bytes_min(fn: Callable[[], object], device: str, cheap_s: float = 1.0) -> int:
    """``peak_bytes``, repeated (smallest kept) when a call is cheap: the first call after
    the allocator switch may also count one-time allocations (library workspaces)."""
    t0 = time.perf_counter()
    peak = peak_bytes(fn, device)
    if time.perf_counter() - t0 < cheap_s:
        peak = min(peak, peak_bytes(fn, device))
    return peak


def time_alternating(fns: Sequence[Callable[[], object]], device: str, budget_s: float,
                     min_reps: int = 3, max_reps: int = 30) -> list[list[float]]:
    """Run the callables in turn (one warm-up round, then rounds until ``budget_s`` is spent
    or ``max_reps`` rounds); returns each one's list of per-call seconds."""
    times: list[list[float]] = [[] for _ in fns]
    t_start = time.perf_counter()
    for fn in fns:  # warm-up round (lazy init, caches, thread pools)
        sync(device)
        fn()
        sync(device)
    warm = time.perf_counter() - t_start
    reps = int(max(min_reps, min(max_reps, budget_s / max(warm, 1e-6))))
    for _ in range(reps):
        for k, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
            del out
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


@dataclass
class Machine:
    """This machine's measured limits (the roofline's two ceilings)."""

    device: str
    name: str
    threads: int
    copy_gbs: float  # memory bandwidth from a large copy, GB/s (read + write bytes counted)
    gemm_gflops: float  # fp32 matmul throughput, GFLOP/s (a practical compute ceiling)

    def floor_s(self, bytes_: float, flops: float) -> float:
        """Roofline floor: the slower of moving ``bytes_`` and computing ``flops``."""
        return max(bytes_ / (self.copy_gbs * 1e9), flops / (self.gemm_gflops * 1e9))


def measure_machine(device: str, copy_mib: int = 1024, gemm_n: int = 2048) -> Machine:
    """Bandwidth of a ``copy_mib`` MiB tensor copy and throughput of an n^3 sgemm (best of 5)."""
    n = copy_mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    copy_gbs = 2 * n * 4 / best / 1e9
    del a, b
    x = torch.randn(gemm_n, gemm_n, device=device)
    y = torch.randn(gemm_n, gemm_n, device=device)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(x, y)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    gemm = 2 * gemm_n**3 / best / 1e9
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_model()
    return Machine(device, name, torch.get_num_threads(), copy_gbs, gemm)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
