"""`cltrace eval` against its floor: SAEs at resid_post of a few layers of the real Gemma 3 270M
(CPU, fp32), on rows of English text.

Timed warm (one untimed run first), median of --repeat: the whole
:func:`cltrace.evaluation.evaluate_set` call. The floor beside it, with this machine's rates
measured in the same process (``benchmarks.harness.measure_machine``):

  the work eval must do: one clean pass (every layer + the unembedding of the predicted
  positions), then per evaluated layer L two passes (spliced, zero-ablated) of which only
  layers L.. and the unembedding depend on the splice (layers < L are the clean pass's: a
  floor that reuses them), plus the encode and decode of each evaluated layer:

  FLOPs  2 x N x (block matmul weights) per layer run + causal attention (2 x 2 x T^2/2 x
         heads x head_dim per row) + 2 x N x d_model x vocab per unembedding + 2 x 2 x N x
         d_model x d_sae per layer (encode; the decode as a dense matmul)
  floor  FLOPs / sgemm rate (compute-bound: the weights are read once per pass)

eval itself runs every spliced pass from the embedding (it does not restart at layer L), so the
floor above is below what its design computes; the ratio says how far the whole is from the
least work. SAE weights are random (no Gemma Scope 2 weights offline): thresholds at mean +
2.6 SD of each latent's pre-activation (about 0.5 % firing). Peak RSS is reported.

    PYTHONPATH=python python -m benchmarks.end_to_end.bench_eval --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.end_to_end.bench_lens import TEXT
from benchmarks.harness import measure_machine, peak_rss_mib

ROOT = Path(__file__).resolve().parents[2]


def random_saes(acts: dict, d_sae: int, n_layers: int, seed: int = 0):
    """Random resid_post SAEs at the layers of ``acts`` (``acts[L] [T, d]``): W_enc ~ N(0, 1/d),
    thresholds at mean + 2.6 SD of each latent's pre-activation, W_dec ~ N(0, 1/d_sae)."""
    from cltrace.transcoders.base import LayerTranscoder, TranscoderSet

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for L, x in acts.items():
        d = x.shape[1]
        W_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
        z = x @ W_enc
        thr = (z.mean(0) + 2.6 * z.std(0)).clamp_min(1e-3)
        W_dec = (torch.randn(d_sae, d, generator=g) / d_sae ** 0.5).unsqueeze(1)
        layers[L] = LayerTranscoder(W_enc, torch.zeros(d_sae), thr, W_dec, torch.zeros(d))
    return TranscoderSet("plt", n_layers, layers, model_name="gemma-3-270m", source="random",
                         site_in="resid_post", site_out="resid_post")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--layers", default="3,9,15")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "eval.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()

    from cltrace.evaluation import EvalSettings, evaluate_set
    from cltrace.models import load_model
    from cltrace.models.anatomy import text_parts
    from cltrace.models.sites import run_sites

    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    ids = tok(TEXT * 8, return_tensors="pt")["input_ids"][0]
    body = ids[ids != tok.bos_token_id]
    n = a.ctx - 1
    rows = torch.stack([torch.cat([torch.tensor([tok.bos_token_id]), body[r * n:(r + 1) * n]])
                        for r in range(a.rows)])  # [rows, ctx]
    parts = text_parts(model)
    layers = [int(x) for x in a.layers.split(",")]
    rec = run_sites(parts, rows, [("resid_post", L) for L in layers])
    acts = {L: rec["resid_post", L][:, 1:].reshape(-1, parts.d_model) for L in layers}
    ts = random_saes(acts, a.d_sae, parts.n_layers)
    N = a.rows * (a.ctx - 1)  # evaluated positions (no <bos>)
    settings = EvalSettings(tokens=N, batch=a.rows, ctx=a.ctx)

    def run():
        return evaluate_set(loaded, ts, rows, settings)

    run()
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        rep = run()
        times.append(time.perf_counter() - t0)
    machine = measure_machine("cpu", copy_mib=512)

    cfg = parts.config
    d, H, KV, hd, I, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          cfg.head_dim, cfg.intermediate_size, cfg.vocab_size)
    per_layer = 2 * N * (d * H * hd + 2 * d * KV * hd + H * hd * d + 3 * d * I) \
        + a.rows * 2 * 2 * (a.ctx * (a.ctx + 1) / 2) * H * hd
    unembed = 2 * N * d * V
    n_layers = parts.n_layers
    flops = n_layers * per_layer + unembed  # the clean pass
    flops += sum(2 * ((n_layers - L) * per_layer + unembed) for L in layers)  # spliced, zeroed
    flops += len(layers) * 2 * 2 * N * d * a.d_sae  # encode + decode
    floor = flops / (machine.gemm_gflops * 1e9)
    med = statistics.median(times)
    out = {
        "cpu": machine.name, "threads": machine.threads, "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "sgemm_gflops": machine.gemm_gflops,
        "rows": a.rows, "ctx": a.ctx, "positions": N, "layers": layers, "d_sae": a.d_sae,
        "eval_median_s": med, "eval_min_s": min(times), "runs": len(times),
        "flops": flops, "floor_s": floor, "fraction_of_floor": floor / med,
        "l0": {r.layer: r.l0 for r in rep.layers}, "fvu": {r.layer: r.fvu for r in rep.layers},
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
