"""The feature lens against its floor: 64 tokens of text, 18 layers of 16k random JumpReLU
SAEs at resid_post on the real Gemma 3 270M (CPU, fp32).

Timed warm (after two untimed runs), median of --repeat: the whole :func:`cltrace.lens.feature_lens`
call, and its two parts alone (the forward pass to the last layer with the sites recorded; the
18 encodes with top-k), plus a dense alternative of the encode (x @ W_enc + b_enc, mask, top-k)
for comparison. The floor beside it, with this machine's rates measured in the same process
(``benchmarks.harness.measure_machine``: an n^3 sgemm and a 1 GiB copy):

  FLOPs  forward: 2 x T x (the block's matmul weights) per layer + attention scores and values
         (2 x 2 x T^2/2 x heads x head_dim, causal), no unembedding (the lens stops after the
         last layer); encode: 2 x T x d_model x d_sae per layer
  bytes  the weights read: each layer's matmul weights and W_enc (fp32)
  floor  max(FLOPs / sgemm rate, bytes / copy bandwidth)

--threads sets torch's thread count (the rates are then measured at that count too): on a
machine whose cores other processes share, fewer threads than cores can be much faster.

SAE weights are random (no Gemma Scope 2 weights offline): W_enc ~ N(0, 1/d_model), the
thresholds set so that about 0.5 % of latents fire per token on this text, W_dec a broadcast
view (the lens never reads it). Peak RSS of the process is reported.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_lens --repeat 7
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import measure_machine, peak_rss_mib

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("The capital of France is Paris, and the capital of Germany is Berlin. In the spring the "
        "river floods the low fields, and the farmers move their sheep to the hills until the "
        "water falls again. Every evening the old man counts the boats that come back to the "
        "harbour, writing each name in a small book.")


def random_saes(acts: dict, d_sae: int, n_layers: int, seed: int = 0):
    """18 random resid_post SAEs, thresholds at mean + 2.6 SD of each latent's pre-activation
    on ``acts[L] [T, d]`` (about 0.5 % firing)."""
    from cltrace.transcoders.base import LayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for L in range(n_layers):
        x = acts[L]
        d = x.shape[1]
        W_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
        b_enc = torch.zeros(d_sae)
        z = x @ W_enc
        thr = (z.mean(0) + 2.6 * z.std(0)).clamp_min(1e-3)
        W_dec = torch.zeros(1, 1, 1).expand(d_sae, 1, d)  # never read by the lens
        layers[L] = LayerTranscoder(W_enc, b_enc, thr, W_dec, torch.zeros(d))
    return TranscoderSet("plt", n_layers, layers, model_name="gemma-3-270m", source="random-16k",
                         site_in="resid_post", site_out="resid_post")


def forward_flops(cfg, T: int, n_layers: int) -> float:
    d, H, KV, hd, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim, cfg.intermediate_size)
    weights = d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * I  # q, k, v, o, gate, up, down
    attn = 2 * 2 * (T * (T + 1) / 2) * H * hd  # scores and values, causal
    return n_layers * (2 * T * weights + attn), n_layers * weights * 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "lens.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()

    from cltrace.lens import feature_lens
    from cltrace.lens.run import _top_k
    from cltrace.models import load_model
    from cltrace.models.anatomy import text_parts
    from cltrace.models.sites import site_hooks
    from cltrace.ops import jumprelu_encode

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(TEXT * 4, return_tensors="pt")["input_ids"][0][: a.tokens]
    assert ids.numel() == a.tokens
    parts = text_parts(model)
    n_layers = parts.n_layers
    sites = [("resid_post", L) for L in range(n_layers)]
    with torch.no_grad(), site_hooks(parts, record=sites) as rec:
        parts.body(input_ids=ids[None], use_cache=False)
    acts = {L: rec["resid_post", L][0, 1:] for L in range(n_layers)}
    ts = random_saes(acts, a.d_sae, n_layers)

    def run_lens():
        return feature_lens(loaded, ts, ids, top_k=5)

    def run_forward():
        with torch.no_grad(), site_hooks(parts, record=sites) as r:
            parts.body(input_ids=ids[None], use_cache=False)
        return r

    def run_encode():
        for L in range(n_layers):
            tc = ts.layers[L]
            sp = jumprelu_encode(acts[L], tc.W_enc, tc.b_enc, tc.threshold)
            _top_k(sp, acts[L].shape[0], a.d_sae, 5)

    def run_dense():
        for L in range(n_layers):
            tc = ts.layers[L]
            z = torch.addmm(tc.b_enc, acts[L], tc.W_enc)
            z.masked_fill_(z <= tc.threshold, float("-inf")).topk(5, dim=1)

    times = {}
    for name, fn in [("lens", run_lens), ("forward", run_forward), ("encode", run_encode),
                     ("encode_dense", run_dense)]:
        fn(), fn()
        ts_ = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn()
            ts_.append(time.perf_counter() - t0)
        times[name] = {"median_s": statistics.median(ts_), "min_s": min(ts_), "runs": len(ts_)}
    rep = run_lens()
    l0 = statistics.mean(int(c) for s in rep.sets for (_, _, cnt) in s.latents.values() for c in cnt)
    machine = measure_machine("cpu", copy_mib=512)
    cfg = parts.config
    T = a.tokens
    fwd_flops, fwd_bytes = forward_flops(cfg, T, n_layers)
    enc_flops = n_layers * 2 * (T - 1) * cfg.hidden_size * a.d_sae
    enc_bytes = n_layers * cfg.hidden_size * a.d_sae * 4
    flops, bytes_ = fwd_flops + enc_flops, fwd_bytes + enc_bytes
    floor = machine.floor_s(bytes_, flops)
    enc_floor = machine.floor_s(enc_bytes, enc_flops)
    out = {
        "cpu": machine.name, "threads": machine.threads, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "sgemm_gflops": machine.gemm_gflops, "copy_gbs": machine.copy_gbs,
        "tokens": T, "layers": n_layers, "d_sae": a.d_sae, "top_k": 5,
        "active_in_top5_mean": l0, "times": times,
        "flops": {"forward": fwd_flops, "encode": enc_flops},
        "bytes": {"forward": fwd_bytes, "encode": enc_bytes},
        "floor_s": floor, "floor_compute_s": flops / (machine.gemm_gflops * 1e9),
        "floor_bytes_s": bytes_ / (machine.copy_gbs * 1e9), "encode_floor_s": enc_floor,
        "lens_fraction_of_floor": floor / times["lens"]["median_s"],
        "encode_fraction_of_floor": enc_floor / times["encode"]["median_s"],
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
