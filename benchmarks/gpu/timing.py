"""Timings on one device: the two ceilings (copy bandwidth, matmul rate), each compiled kernel
against them, and whole attribution graphs of the Gemma 3 1B shape.

    PYTHONPATH=python python benchmarks/gpu/timing.py --device cuda --json out/timing.json

Kernels are timed with CUDA events (median of ``--reps`` after ``--warmup`` calls) at the 1B
shape (d_model 1152, 16k features, L0 64), float32 and bfloat16. Each kernel's *floor* is the
fewest bytes it must move (every input read once, every output written once; decoder rows
counted once per distinct active feature) over the measured copy bandwidth, and for the
encoder also its FLOPs over the measured matmul rate; ``frac_bw`` = floor-bytes / time / copy
bandwidth. Whole graphs: 64 and 512 tokens x 2,048 and 8,192 feature nodes x fp32 and bf16 (the
64-token ones first), after one small warm-up graph per dtype, timed wall-clock around
``attribute`` with a device sync. Every case is guarded and skipped once ``--budget-s`` is spent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, build_model, build_transcoders, mlp_inputs, prompt_tokens  # noqa: E402

C = torch.ops.cltrace


class Clock:
    """Median seconds of fn() on the device (CUDA events) or wall clock (CPU)."""

    def __init__(self, device: str, warmup: int, reps: int):
        self.cuda = str(device).startswith("cuda")
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return median(times)


def ceilings(dev, clock: Clock, small: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and matmul rate (fp32, bf16)."""
    n = (1 << 22) if small else (1 << 28)  # fp32 elements: 16 MiB / 1 GiB
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    t = clock(lambda: dst.copy_(src))
    out = {"copy_bytes": 2 * 4 * n, "copy_s": t, "copy_GBps": 2 * 4 * n / t / 1e9}
    m = 512 if small else 8192
    for dt, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        a = torch.randn(m, m, device=dev).to(dt)
        b = torch.randn(m, m, device=dev).to(dt)
        t = clock(lambda: a @ b)
        out[f"matmul_{name}_TFLOPs"] = 2 * m ** 3 / t / 1e12
    out["tf32_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32) if clock.cuda else False
    del src, dst
    return out


def sparse_rows(N: int, F: int, L0: int, dev) -> tuple:
    """CSR (row_offsets [N+1], feat_idx [N*L0] ascending per row) with distinct features."""
    feats = torch.rand(N, F, device=dev).argsort(dim=1)[:, :L0].sort(dim=1).values
    off = torch.arange(0, N * L0 + 1, L0, device=dev)
    return off, feats.reshape(-1).contiguous()


def kernel_cases(dev, dtype, small: bool) -> list[tuple]:
    """(name, fn, floor_bytes, touched_bytes or None, flops) for every compiled op at the 1B
    shape. floor: each distinct decoder row once; touched: each entry's row once."""
    d, F, L0 = (1152, 16384, 64) if not small else (128, 1024, 16)
    N = 2048 if not small else 64
    es = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g).to(dtype)  # noqa: E731
    cases = []
    # encoder: z = x @ W_enc + b_enc, threshold at the L0-th largest z per row on average
    x, W_enc, b_enc = rnd(N, d), rnd(d, F) / d ** 0.5, 0.1 * rnd(F)
    z = (x.float() @ W_enc.float() + b_enc.float()).flatten()
    thr = torch.full((F,), float(z.topk(N * L0).values[-1]), device=dev, dtype=dtype)
    del z
    enc = C.jumprelu_encode(x, W_enc, b_enc, thr, 0.0)
    nnz = enc[1].numel()
    cases.append(("jumprelu_encode", lambda: C.jumprelu_encode(x, W_enc, b_enc, thr, 0.0),
                  (N * d + d * F + 2 * F) * es + nnz * (8 + 2 * es), None, 2 * N * d * F))
    ga = torch.randn(nnz, device=dev, generator=g).to(dtype)
    cases.append(("jumprelu_encode_backward",
                  lambda: C.jumprelu_encode_backward(ga, x, W_enc, thr, enc[0], enc[1], enc[3], 0.0),
                  (2 * N * d + 2 * d * F + 2 * F) * es + nnz * (8 + 2 * es), None, 4 * nnz * d))
    # decoders: PLT [F, 1, d] and a CLT slice full[:, 2:, :] of [F, 10, d] (n_out 8)
    off, fi = sparse_rows(N, F, L0, dev)
    acts = torch.rand(fi.numel(), device=dev, generator=g).to(dtype) + 0.5
    uniq = int(fi.unique().numel())
    full = rnd(F, 10 if not small else 4, d)
    for name, W in [("plt", rnd(F, 1, d)), ("clt_slice", full[:, 2:, :])]:
        D = W.shape[1] * d
        cases.append((f"sparse_decode_{name}", lambda W=W: C.sparse_decode(off, fi, acts, W),
                      (uniq * D + N * D) * es + fi.numel() * (8 + es),
                      (fi.numel() * D + N * D) * es + fi.numel() * (8 + es), 2 * fi.numel() * D))
        go = rnd(N, W.shape[1], d)
        cases.append((f"sparse_decode_backward_{name}",
                      lambda W=W, go=go: C.sparse_decode_backward(go, off, fi, acts, W),
                      (N * D + 2 * uniq * D + F * D) * es + fi.numel() * (8 + 2 * es),
                      (2 * fi.numel() * D + F * D) * es + fi.numel() * (8 + 2 * es),
                      4 * fi.numel() * D))
    # contraction as attribution calls it: a seed-major [k, n, d] gradient, sources sorted by
    # position, W_dec a PLT or a CLT slice
    n, k = (512, 64) if not small else (32, 8)
    grad = rnd(k, n, d)
    S = n * L0
    pos = torch.arange(n, device=dev).repeat_interleave(L0)
    sf = torch.randint(0, F, (S,), device=dev, generator=g)
    sa = torch.rand(S, device=dev, generator=g).to(dtype) + 0.5
    u_s = int(sf.unique().numel())
    Wp = rnd(F, d)
    for name, W in [("plt", Wp), ("clt_slice", full[:, 3, :])]:
        cases.append((f"attribution_contract_{name}",
                      lambda W=W: C.attribution_contract(grad, pos, W, sf, sa),
                      (u_s * d + n * k * d + k * S) * es + S * (16 + es),
                      (S * d + n * k * d + k * S) * es + S * (16 + es), 2 * k * S * d))
    # what every call cost before the op read strided gradients in place: a copy first
    cases.append(("attribution_contract_plt_after_copy",
                  lambda: C.attribution_contract(grad.contiguous(), pos, Wp, sf, sa),
                  (u_s * d + 3 * n * k * d + k * S) * es + S * (16 + es), None, 2 * k * S * d))
    idx = torch.randint(0, F, (k,), device=dev, generator=g)
    cases.append(("gather_columns", lambda: C.gather_columns(W_enc, idx), 2 * k * d * es, None, 0))
    return cases


def time_kernels(dev, clock: Clock, ceil: dict, small: bool, deadline: float) -> list[dict]:
    out = []
    for dtype, dname in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        try:
            cases = kernel_cases(dev, dtype, small)
        except Exception as exc:
            out.append({"dtype": dname, "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-2000:]})
            continue
        for name, fn, nbytes, touched, flops in cases:
            if time.perf_counter() > deadline:
                out.append({"kernel": name, "dtype": dname, "skipped": "time budget spent"})
                continue
            r = {"kernel": name, "dtype": dname, "floor_bytes": nbytes, "flops": flops}
            try:
                t = clock(fn)
                r["seconds"] = t
                r["GBps"] = nbytes / t / 1e9
                r["frac_bw"] = r["GBps"] / ceil["copy_GBps"]
                if touched:  # bytes if every entry's row came from memory (no reuse in cache)
                    r["touched_bytes"] = touched
                    r["frac_bw_touched"] = touched / t / 1e9 / ceil["copy_GBps"]
                rate = ceil.get(f"matmul_{dname}_TFLOPs")
                if flops and rate:
                    r["TFLOPs"] = flops / t / 1e12
                    r["frac_matmul"] = r["TFLOPs"] / rate
                r["floor_s"] = max(nbytes / (ceil["copy_GBps"] * 1e9),
                                   flops / (rate * 1e12) if flops and rate else 0.0)
            except Exception as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"
            out.append(r)
            print(json.dumps(r), flush=True)
        del cases
    return out


def _attribute(attribute, tokens, rm, nodes: int, phases: dict):
    try:
        return attribute(tokens, rm, max_feature_nodes=nodes, batch_size=64, timings=phases)
    except TypeError:  # an attribute() without the timings argument
        return attribute(tokens, rm, max_feature_nodes=nodes, batch_size=64)


def time_graphs(dev, shape_name: str, configs: list[tuple], warm: tuple, deadline: float,
                out: list, save) -> None:
    """Whole graphs, appended to ``out`` (``save()`` after each): configs of (n_pos, nodes,
    dtype name) in the order given; a small warm-up graph before a dtype's first."""
    from cltrace.attribution import attribute
    from cltrace.replacement import ReplacementModel

    shape = SHAPES[shape_name]
    cuda = str(dev).startswith("cuda")
    models: dict = {}
    for n_pos, nodes, dname in configs:
        runs = [(n_pos, nodes, False)]
        if dname not in models:
            try:
                models[dname] = build_model(shape, dev, torch.float32 if dname == "fp32" else torch.bfloat16)
            except Exception as exc:
                models[dname] = None
                out.append({"dtype": dname, "error": f"build: {type(exc).__name__}: {exc}"})
            runs.insert(0, (warm[0], warm[1], True))
        model = models[dname]
        if model is None:
            continue
        dtype = torch.float32 if dname == "fp32" else torch.bfloat16
        for n, k, is_warm in runs:
            r = {"shape": shape_name, "n_pos": n, "nodes": k, "dtype": dname, "warmup": is_warm}
            if time.perf_counter() > deadline:
                r["skipped"] = "time budget spent"
                out.append(r)
                continue
            try:
                tokens = prompt_tokens(shape, n, seed=1).to(dev)
                ts, _ = build_transcoders(shape, dev, dtype, mlp_in=mlp_inputs(model, tokens))
                rm = ReplacementModel(model, ts)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                phases: dict = {}
                t0 = time.perf_counter()
                g = _attribute(attribute, tokens, rm, k, phases)
                if cuda:
                    torch.cuda.synchronize()
                r["seconds"] = time.perf_counter() - t0
                r["phases"] = phases
                if cuda:
                    r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
                r["graph"] = [int(g.edges.shape[0]), int(g.edges.shape[1])]
                r["finite"] = bool(torch.isfinite(g.edges).all())
                try:  # active features of the prompt (for the record; not timed)
                    r["n_active"] = int(sum(a.feat_idx.numel() for a in rm.run(tokens, all_logits=False).acts))
                except Exception as exc:
                    r["n_active"] = f"{type(exc).__name__}: {exc}"
                del g, rm, ts
            except Exception as exc:
                r["error"] = f"{type(exc).__name__}: {exc}"
                r["traceback"] = traceback.format_exc()[-2000:]
            out.append(r)
            save()
            print(json.dumps({k2: v for k2, v in r.items() if k2 != "traceback"}), flush=True)
            if cuda:
                torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU dry run)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=180)
    ap.add_argument("--graph-shape", default="1b")
    ap.add_argument("--graphs", default="64x2048,64x8192,512x2048,512x8192",
                    help="comma-separated n_pos x nodes")
    ap.add_argument("--skip", default="", help="comma-separated: kernels, graphs")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    t_start = time.perf_counter()
    deadline = t_start + a.budget_s
    dev = a.device
    clock = Clock(dev, a.warmup, a.reps)
    res: dict = {"device": dev, "argv": sys.argv, "torch": str(torch.__version__)}
    if str(dev).startswith("cuda"):
        res["device_name"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the default)
    skip = set(filter(None, a.skip.split(",")))

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=str))

    try:
        res["ceilings"] = ceilings(dev, clock, a.small)
        print(json.dumps(res["ceilings"]), flush=True)
    except Exception as exc:
        res["ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
    save()
    if "kernels" not in skip and "copy_GBps" in res["ceilings"]:
        # kernels get at most a third of the budget; graphs the rest
        res["kernels"] = time_kernels(dev, clock, res["ceilings"], a.small,
                                      min(deadline, time.perf_counter() + a.budget_s / 3))
        save()
    if "graphs" not in skip:
        # the 64-token graphs (the 2 s target) first, in both dtypes, then the longer prompts
        sizes = [tuple(int(v) for v in item.split("x")) for item in a.graphs.split(",")]
        configs = [(n, k, dname) for n in sorted({n for n, _ in sizes})
                   for dname in ("fp32", "bf16") for m, k in sizes if m == n]
        res["graphs"] = []
        time_graphs(dev, a.graph_shape, configs, (16, 64), deadline, res["graphs"], save)
        save()
    res["wall_s"] = time.perf_counter() - t_start
    save()


if __name__ == "__main__":
    main()
