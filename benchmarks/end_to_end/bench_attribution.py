"""cltrace vs circuit-tracer 0.5.0: attribution time, peak memory and agreement, per phase.

    python benchmarks/bench_attribution.py            # full matrix (see CASES; ~40 min here)
    python benchmarks/bench_attribution.py --quick    # a minute-scale subset

Both sides run as subprocesses, alternating case by case, on the same inputs
(:mod:`bench_inputs`): cltrace from this checkout (``run_cltrace.py``), circuit-tracer from
its own venv ``benchmarks/.venv-peer`` that this script creates (torch==2.13.0 first, which
resolves to the local CPU wheel, then ``circuit-tracer==0.5.0``) and runs ``run_peer.py``.
No circuit-tracer code is imported here. Per case it reports wall time and peak RSS per
phase (load, forward, attribution, pruning, export), the ratios cltrace/peer, the agreement
of the two adjacency matrices on the shared nodes, and the floor of the work
(:func:`floor`). Results: ``benchmarks/out/attribution.json`` and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
from tests.support.peer import PEER_PY, ensure_peer  # noqa: E402  (the reference's venv)
from tests.support.peer import agreement as peer_agreement  # noqa: E402

CASES = [(k, n, m) for k in ("plt", "clt") for n in (8, 64, 512) for m in (2048, 8192)]
QUICK = [("plt", 8, 2048), ("plt", 64, 2048)]


def run(cmd: list[str], timeout: float, walls: list | None = None) -> str:
    """Run one side as its own process; its wall time (interpreter start to exit: imports,
    load, attribution, pruning, export) is appended to ``walls``."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if walls is not None and p.returncode == 0:
            walls.append(time.perf_counter() - t0)
        return "" if p.returncode == 0 else f"exit {p.returncode}: {p.stderr[-1500:]}"
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"


def agreement(a_path: str, b_path: str, n_layers: int, n_pos: int) -> dict:
    """:func:`peer.agreement` of two saved edge-row sets."""
    from safetensors.torch import load_file

    return peer_agreement(load_file(a_path), load_file(b_path), n_layers, n_pos)


def floor(res: dict, features: torch.Tensor, n_layers=18, d=640, n_heads=4, n_kv=1, hd=256,
          skip=True, n_out_avg=1.0, batch=64, skip_positions=1) -> dict:
    """The minimum work of one attribution, from the case's sizes and visited features.

    Linearised backward of one target row, per position from the first with nodes
    (``skip_positions``: <bos> has none; the tokens before it need no carried positions,
    ``FrozenLinearModel.prefix_paths``) up to the target's (causal): a feature row at (ℓ, p)
    reads x_ℓ, so its gradient passes the attention of layers ℓ .. 0 (ℓ + 1 of them: W_O
    2·d·H·hd + W_V 2·n_kv·hd·d + the frozen pattern 2·H·hd·n) and the affine skip of layers
    ℓ-1 .. 0 (ℓ of them: 2·d²), each at p + 1 - skip_positions positions; a logit row
    n_layers of both at n_pos - skip_positions positions. (Until 2026-12-02 this counted ℓ
    attentions, one too few, and every position from 0: p + 1; the floors of the fourth
    session are the p + 1 form.) Edge contraction: 2·d·n_out per (row, active feature).
    Decoder rows read once per batch of rows: n_batches · n_active · n_out · d · 4 bytes."""
    n, act = res["n_pos"], res["n_active"]
    rows = res["n_visited"] + res["n_logits"]
    attn = 2 * d * n_heads * hd + 2 * n_kv * hd * d + 2 * n_heads * hd * n
    skip_flop = 2 * d * d if skip else 0
    layer, npos = features[:, 0].double(), features[:, 1].double() + 1 - skip_positions
    bwd = (attn * ((layer + 1) * npos).sum().item() + skip_flop * (layer * npos).sum().item()
           + (attn + skip_flop) * res["n_logits"] * n_layers * (n - skip_positions))
    contract = rows * act * 2 * d * n_out_avg
    dec_bytes = -(-rows // batch) * act * n_out_avg * d * 4
    return {"backward_flop": bwd, "contract_flop": contract, "decoder_bytes": dec_bytes}


def machine_flops() -> float:
    """Measured fp32 matmul rate of this machine now (FLOP/s), for time / floor."""
    a, b = torch.randn(2048, 640), torch.randn(640, 1024)
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        a @ b
        k += 1
    return k * 2 * 2048 * 640 * 1024 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per side and case")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--cases", default="", help="e.g. plt:64:2048,clt:8:8192 (m 0: all features)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each case this many times, the two sides alternating (whole-process "
                         "wall times: the median is reported)")
    a = ap.parse_args()
    out = Path(a.out)
    inp = out / "inputs"
    inp.mkdir(parents=True, exist_ok=True)
    if not a.no_peer:
        ensure_peer()
    from .inputs import peer_model_dir, prompts, transcoder_sets
    from cltrace.models import load_model

    cases = QUICK if a.quick else CASES
    if a.cases:
        cases = [(k, int(n), int(m)) for k, n, m in (c.split(":") for c in a.cases.split(","))]
    lm = load_model("gemma-3-270m", progress=lambda s: None)
    model_dir = peer_model_dir(inp)
    pfiles = prompts(inp, lm.tokenizer, sorted({n for _, n, _ in cases}))
    sets = transcoder_sets(inp, lm, a.width, a.l0, 2048)
    del lm
    results = []
    for kind, n, m in cases:
        tag = f"{kind}-n{n}-m{m}"
        r: dict = {"kind": kind, "n_pos": n, "max_feature_nodes": m, "load_avg": os.getloadavg()}
        base = ["--prompt", pfiles[n], "--batch-size", "64"] + (["--max-feature-nodes", str(m)] if m else [])
        ours, peer = str(out / f"cltrace-{tag}"), str(out / f"peer-{tag}")
        walls: dict = {"cltrace": [], "peer": []}
        for _ in range(a.repeat):  # alternating: both sides see the same machine state
            r["cltrace_error"] = run([sys.executable, "-m", "benchmarks.end_to_end.run_cltrace", "--transcoders",
                                      sets[kind]["cltrace"], "--out", ours] + base, a.timeout, walls["cltrace"])
            if not a.no_peer:
                r["peer_error"] = run([str(PEER_PY), "-m", "benchmarks.end_to_end.run_peer", "--model-dir", str(model_dir),
                                       "--transcoders", sets[kind]["peer"], "--kind", kind, "--out", peer]
                                      + base, a.timeout, walls["peer"])
        r["process_s"] = {k: sorted(v)[len(v) // 2] for k, v in walls.items() if v}
        r["process_runs_s"] = walls
        if not r["cltrace_error"]:
            r["cltrace"] = json.loads(Path(ours + ".json").read_text())
        if not a.no_peer:
            if Path(peer + ".json").exists() and not r["peer_error"]:
                r["peer"] = json.loads(Path(peer + ".json").read_text())
                if not r["peer"].get("ok"):
                    r["peer_error"] = r["peer"].get("error")
            if "cltrace" in r and r.get("peer", {}).get("ok"):
                r["agreement"] = agreement(ours + ".safetensors", peer + ".safetensors", 18, n)
        if "cltrace" in r:
            c = r["cltrace"]
            c["n_pos"] = n
            from safetensors.torch import load_file
            feats = load_file(ours + ".safetensors")["features"]
            r["floor"] = floor(c, feats, skip=(kind == "plt"), n_out_avg=1.0 if kind == "plt" else 9.5)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("floor",)}, default=str)[:1500], flush=True)
        (out / ("attribution-quick.json" if a.quick else "attribution.json")).write_text(
            json.dumps({"flops": machine_flops(), "results": results}, indent=1, default=str))
    print(table(results))


def table(results: list[dict]) -> str:
    lines = ["| set | tokens | max nodes | active | cltrace attr s | peer attr s | ratio | "
             "cltrace peak MiB | peer peak MiB | mem ratio | agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, p = r.get("cltrace", {}), r.get("peer", {})
        ca = c.get("times", {}).get("attribution", float("nan")) + c.get("times", {}).get("forward", 0)
        pa = p.get("times", {}).get("attribution", float("nan"))
        cm, pm = max(c.get("rss_mib", {"x": float("nan")}).values()), max(p.get("rss_mib", {"x": float("nan")}).values())
        ag = r.get("agreement", {}).get("max_abs_over_max", r.get("peer_error") or "")
        lines.append(f"| {r['kind']} | {r['n_pos']} | {r['max_feature_nodes']} | {c.get('n_active', '')} | "
                     f"{ca:.1f} | {pa:.1f} | {ca / pa:.3f} | {cm:.0f} | {pm:.0f} | {cm / pm:.2f} | {ag} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
