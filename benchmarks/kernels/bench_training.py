"""Training-step throughput: compiled sparse JumpReLU forward/backward vs dense torch autograd.

One training step = loss (encode, decode, affine skip, L0 and frequency penalties) + backward
+ Adam update, on one per-layer transcoder with Gemma 3 270M's d_model (640). Both backends are
the same :class:`cltrace.training.TranscoderParams` (``backend="sparse"`` uses
``jumprelu_encode`` with the straight-through backward and ``sparse_decode``; ``"dense"``
materialises ``[B, d_sae]`` and lets autograd differentiate a dense JumpReLU with the same
STE). Timings alternate between the two backends in one process; peak memory is measured per
backend in a fresh subprocess (peak RSS growth over the set-up, or peak CUDA allocation).

    PYTHONPATH=python python -m benchmarks.kernels.bench_training [--widths 2048 4096 16384] [--device cuda]

Writes benchmarks/RESULTS_training.md (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from cltrace.training import TrainConfig, TranscoderParams

D_MODEL = 640


def make(width: int, l0: int, batch: int, backend: str, device: str, seed: int = 0):
    cfg = TrainConfig(kind="plt", affine_skip=True, width=width, l0=l0, batch_size=batch,
                      buffer_tokens=batch, backend=backend, tokens=10 ** 9)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4 * batch, D_MODEL, generator=g)
    y = x @ torch.randn(D_MODEL, D_MODEL, generator=g) / D_MODEL ** 0.5 + 0.1 * torch.randn(
        1, 4 * batch, D_MODEL, generator=g)
    p = TranscoderParams(cfg, [0], 1, D_MODEL)
    p.initialize(x, y, g)
    with torch.no_grad():  # non-zero decoders, as after some training
        p.W_dec[0].normal_(0, 0.02, generator=g)
    p = p.to(device)
    xn = (x * p.x_scale.cpu()[:, None, None]).to(device)
    yn = (y * p.y_scale.cpu()[:, None, None]).to(device)
    opt = torch.optim.Adam(p.parameters(), lr=1e-4)
    return p, opt, xn, yn


def step(p, opt, x, y, i: int, batch: int):
    sl = slice((i % 4) * batch, (i % 4 + 1) * batch)
    opt.zero_grad(set_to_none=True)
    loss, stats = p(x[:, sl], y[:, sl])
    loss.backward()
    opt.step()
    return stats


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_alternating(width, l0, batch, device, reps):
    runs = {b: make(width, l0, batch, b, device) for b in ("sparse", "dense")}
    times = {b: [] for b in runs}
    l0s = {b: 0.0 for b in runs}
    for b, r in runs.items():  # warm-up
        step(*r, 0, batch)
    for i in range(reps):
        for b, r in runs.items():
            sync(device)
            t0 = time.perf_counter()
            stats = step(*r, i, batch)
            sync(device)
            times[b].append(time.perf_counter() - t0)
            l0s[b] = stats.l0[0]
    med = {b: sorted(t)[len(t) // 2] for b, t in times.items()}
    return {b: {"step_ms": 1e3 * med[b], "tokens_per_s": batch / med[b], "l0": l0s[b]}
            for b in runs}


def peak_memory(width, l0, batch, backend, device) -> float:
    """MiB: peak memory growth during 3 steps, in a fresh process (CPU: VmHWM after resetting
    it through /proc/self/clear_refs; CUDA: max_memory_allocated)."""
    code = (f"import sys, torch; sys.path[:0] = {sys.path[:2]!r}\n"
            f"from bench_training import make, step, rss_mib\n"
            f"r = make({width}, {l0}, {batch}, {backend!r}, {device!r})\n"
            f"cuda = {device!r}.startswith('cuda')\n"
            f"step(*r, 0, {batch})\n"
            f"if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); "
            f"base = torch.cuda.memory_allocated()\n"
            f"else: open('/proc/self/clear_refs', 'w').write('5'); base = rss_mib('VmRSS')\n"
            f"for i in range(1, 4): step(*r, i, {batch})\n"
            f"peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else "
            f"rss_mib('VmHWM') - base\n"
            f"print(peak)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def rss_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 16384])
    ap.add_argument("--l0", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_training.md")))
    ap.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    args = ap.parse_args()
    rows = []
    for w in args.widths:
        res = time_alternating(w, args.l0, args.batch, args.device, args.reps)
        for b in res:
            res[b]["peak_mib"] = peak_memory(w, args.l0, args.batch, b, args.device)
        rows.append((w, res))
        print(json.dumps({"width": w, **res}), flush=True)
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"### {args.device} ({dev}), torch {torch.__version__}",
             "",
             f"One PLT training step (affine skip, d_model {D_MODEL}, batch {args.batch} tokens, "
             f"target L0 {args.l0}; forward + backward + Adam), median of {args.reps} alternating "
             "reps; peak memory = growth over the weights and optimizer state during 3 steps in a fresh "
             f"process ({'CUDA max allocated' if args.device.startswith('cuda') else 'VmHWM - VmRSS'}).",
             "",
             "| width | sparse ms/step | dense ms/step | sparse tokens/s | dense tokens/s | speed-up "
             "| sparse peak MiB | dense peak MiB | L0 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w, r in rows:
        s, d = r["sparse"], r["dense"]
        lines.append(f"| {w} | {s['step_ms']:.1f} | {d['step_ms']:.1f} | {s['tokens_per_s']:.0f} | "
                     f"{d['tokens_per_s']:.0f} | {d['step_ms'] / s['step_ms']:.2f}x | "
                     f"{s['peak_mib']:.0f} | {d['peak_mib']:.0f} | {s['l0']:.0f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    header = "# Training benchmarks (benchmarks/kernels/bench_training.py)\n\n"
    if args.append and out.exists():
        out.write_text(out.read_text() + "\n" + text)
    else:
        out.write_text(header + text)
    print(text)


if __name__ == "__main__":
    main()
