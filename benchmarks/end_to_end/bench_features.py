"""Feature-page throughput on Gemma 3 270M + the starter set (18 x 2048 PLTs), against the
FLOP floor.

The floor per token: one forward pass of the decoder stack up to the MLP input of the last
transcoder layer (projections 2 x params, attention scores and values, no unembedding) plus
one encode per layer (2 x d_model x d_sae each). Measured, each as the median of --reps runs
on the same batch (rows of --ctx tokens, --batch-rows rows per forward):

  forward          ActivationSource.read (decoder stack, MLP outputs not recorded)
  forward+encode   ... plus the compiled JumpReLU encode of every layer
  scan             ... plus folding the firings into the bounded state (the real pass 1)
  sgemm            a [T, 640] x [640, 2048] matmul: what this machine's BLAS reaches now

then the top/bottom logits of 256 features (2 x d_model x vocab FLOP each; the whole set's cost
is extrapolated) and one whole ``build_pages`` over --tokens tokens on --build-layers (scan,
windows, logits + writing). The 2 CPU cores are shared: the load average is recorded beside
every figure.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_features [--tokens 4096] [--out RESULTS_features.md]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def flop_floor(model, layers, d_sae: int, ctx: int) -> dict:
    """FLOP per token of the forward up to the last layer's MLP input, and of the encodes."""
    from cltrace.models.anatomy import text_parts

    parts = text_parts(model)
    cfg = parts.config
    last = max(layers)
    proj = 0
    for L in range(last + 1):
        lay = parts.layers[L]
        attn = sum(p.numel() for n, p in lay.self_attn.named_parameters() if n.endswith("proj.weight"))
        mlp = sum(p.numel() for p in lay.mlp.parameters()) if L < last else 0
        proj += 2 * (attn + mlp)
    keys = (ctx + 1) / 2  # average causal keys per query (sliding window >= ctx here)
    scores = (last + 1) * 2 * 2 * cfg.num_attention_heads * cfg.head_dim * keys
    encode = len(layers) * 2 * cfg.hidden_size * d_sae
    return {"forward": proj + scores, "encode": encode, "total": proj + scores + encode}


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the whole-build run")
    ap.add_argument("--build-layers", default="0,17", help="layers of the whole-build run")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_features.md")))
    args = ap.parse_args()

    from cltrace.features import FeatureSettings, FeatureState, build_pages
    from cltrace.features.scan import encode_batch, layer_encoders, scan
    from cltrace.features.state import bytes_per_feature
    from cltrace.models import load_model
    from cltrace.models.activations import ActivationSource
    from cltrace.training.corpus import stdlib_texts, token_rows
    from cltrace.training.starter import starter_transcoders

    loaded = load_model("gemma-3-270m")
    ts = starter_transcoders(loaded, progress=lambda *a: None, bar=False)
    layers = sorted(ts.layers)
    bos = loaded.tokenizer.bos_token_id
    texts = stdlib_texts()
    rows = token_rows(loaded.tokenizer, texts, args.ctx, max_tokens=max(args.tokens, args.ctx * args.batch_rows))
    idx = torch.arange(args.batch_rows)
    n_tok = int((rows[idx] != bos).sum())
    enc = layer_encoders(ts, layers)
    src = ActivationSource(loaded.model, rows, layers, bos, batch_rows=args.batch_rows, outputs=False)
    floor = flop_floor(loaded.model, layers, ts.d_sae, args.ctx)
    res = {"threads": torch.get_num_threads(), "batch": f"{args.batch_rows} x {args.ctx}",
           "tokens_per_batch": n_tok, "flop_per_token": floor}

    def fwd():
        return src.read(idx)

    def fwd_enc():
        for _ in encode_batch(enc, src.read(idx).x):
            pass

    def one_scan():
        st = FeatureState.empty({L: ts.d_sae for L in layers}, args.ctx)
        scan(loaded.model, rows, enc, st, bos=bos, row_ids=idx, batch_rows=args.batch_rows, bar=False)

    a = torch.randn(n_tok, 640)
    w = torch.randn(640, ts.d_sae)
    gemm_flop = 2 * n_tok * 640 * ts.d_sae
    fwd_enc()  # warm-up
    # Each step alternates with "the floor": sgemm calls worth the step's floor FLOP, timed
    # right before it, so the fraction of the floor is measured under the same load.
    for name, fn, flop in [("forward", fwd, floor["forward"]), ("forward+encode", fwd_enc, floor["total"]),
                           ("scan", one_scan, floor["total"])]:
        m = max(1, round(flop * n_tok / gemm_flop))
        la, ts_, fr = load(), [], []
        for _ in range(args.reps):
            tg = median_time(lambda: [a @ w for _ in range(m)], 1)
            t = median_time(fn, 1)
            ts_.append(t)
            fr.append(tg / t)
        t = statistics.median(ts_)
        res[name] = {"s_per_batch": t, "tokens_per_s": n_tok / t, "fraction_of_floor": statistics.median(fr),
                     "sgemm_gflops": m * gemm_flop / tg / 1e9, "load": la}
        print(name, res[name], flush=True)

    from cltrace.features.logits import top_bottom_logits
    la = load()
    t0 = time.perf_counter()
    top_bottom_logits(loaded.model, ts, 0, torch.arange(256))
    t = time.perf_counter() - t0
    vocab, d = loaded.model.lm_head.weight.shape
    res["logits"] = {"s_per_feature": t / 256, "gflops": 256 * 2 * vocab * d / t / 1e9, "load": la,
                     "s_whole_set": t / 256 * ts.d_sae * len(layers)}
    print("logits", res["logits"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        n_rows = -(-args.tokens // (args.ctx - 1))
        la = load()
        t0 = time.perf_counter()
        blayers = [int(x) for x in args.build_layers.split(",")]
        b = build_pages(loaded.model, loaded.tokenizer, ts, rows[:n_rows], blayers, Path(tmp) / "p",
                        settings=FeatureSettings(batch_rows=args.batch_rows), bar=False)
        res["build"] = {"layers": blayers, "tokens": b.n_tokens, "pages": b.n_pages, "features": b.n_features,
                        "seconds": b.seconds, "total_s": time.perf_counter() - t0, "load": la,
                        "scan_tokens_per_s": b.n_tokens / b.seconds["scan"]}
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["state_bytes_per_feature"] = bytes_per_feature(20, 20)
    res["state_gib_262k_x18"] = bytes_per_feature(20, 20) * 262144 * 18 / 2**30
    write(res, Path(args.out))
    print(json.dumps(res, indent=1))


def write(res: dict, path: Path) -> None:
    f = res["flop_per_token"]
    lines = ["# Feature pages: throughput (Gemma 3 270M + starter 18 x 2048 PLTs, CPU)", "",
             f"FLOP floor per token: forward {f['forward'] / 1e6:.0f} M + encode {f['encode'] / 1e6:.0f} M"
             f" = **{f['total'] / 1e6:.0f} MFLOP** (rows of 128 tokens, no unembedding, no last layer's MLP).",
             f"{res['threads']} threads; batch {res['batch']} ({res['tokens_per_batch']} tokens).", "",
             "The floor's time is measured as sgemm calls ([T, 640] x [640, 2048]) worth the step's FLOP,",
             "alternating with the step, so both see the same load.", "",
             "| step | tokens/s | fraction of the floor (its FLOP at sgemm speed) | sgemm GFLOP/s then | load average (1/5/15 min) |",
             "|---|---|---|---|---|"]
    for name in ("forward", "forward+encode", "scan"):
        r = res[name]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['fraction_of_floor']:.0%} | "
                     f"{r['sgemm_gflops']:.0f} | {r['load']} |")
    lines += ["", "(scan: one batch into an empty state, where every firing enters the top-K and the "
              "sample: the state update's worst case.)", ""]
    g = res["logits"]
    lines += [f"Top/bottom logits: {g['s_per_feature'] * 1e3:.1f} ms per feature ({g['gflops']:.1f} GFLOP/s, "
              f"load {g['load']}): {g['s_whole_set']:.0f} s for the whole set.", ""]
    b = res["build"]
    lines += [f"Whole build on layers {b['layers']} over {b['tokens']} tokens ({b['pages']} of {b['features']} features fired): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in b["seconds"].items())
              + f"; scan {b['scan_tokens_per_s']:.0f} tokens/s (load {b['load']}).",
              f"Peak RSS {res['peak_rss_gib']:.2f} GiB (model, set, state, windows).", "",
              f"State: {res['state_bytes_per_feature']} B per feature at K = S = 20: a 262k-wide set on "
              f"18 layers needs {res['state_gib_262k_x18']:.1f} GiB, whatever the corpus length.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
