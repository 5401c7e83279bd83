"""Inputs shared by cltrace and circuit-tracer in the attribution benchmark (written once).

* the real Gemma 3 270M: cltrace loads its cached safetensors copy; the peer (transformers
  4.57) gets a folder with a 4.57-style config (``rope_theta``/``rope_local_base_freq``
  instead of transformers 5's ``rope_parameters``) and links to the same weights/tokenizer;
* synthetic transcoders calibrated on real MLP inputs (:func:`cltrace.training.starter.fit_starter_set`:
  random encoders, thresholds for the requested L0, least-squares decoders; NOT trained):
  a per-layer set with affine skip and a CLT, each written in the Gemma Scope 2 layout (for
  cltrace) and in circuit-tracer's layout (for the peer) from the same tensors;
* prompts of the requested lengths (token ids from calibration text, <bos> first).
"""
from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
from tests.support.peer import peer_model_dir  # noqa: E402,F401  (re-exported for bench_attribution)


def transcoder_sets(out: Path, loaded, width: int, l0: int, n_tokens: int) -> dict:
    """{kind: {"cltrace": folder, "peer": folder}} for kind in ("plt", "clt").

    The per-layer set (affine skip) is fitted on real MLP inputs/outputs; the CLT reuses its
    encoders, thresholds and same-layer decoders (no skip) and adds small random decoders to
    the later layers, as :func:`fit_starter_set` does (fitting it anew means 18 more
    4096x4096 float64 solves: over 15 minutes on the loaded 2-core machine)."""
    from cltrace.training.starter import collect_mlp_io, fit_starter_set
    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.base import LayerTranscoder, TranscoderSet
    from cltrace.transcoders.write import save_gemmascope
    from tests.support.layouts import write_circuit_tracer_clt, write_circuit_tracer_plt

    sets, plt = {}, None
    for kind in ("plt", "clt"):
        tag = f"{kind}-w{width}-l0_{l0}"
        ours, peer = out / f"tc-{tag}-gemmascope", out / f"tc-{tag}-circuit-tracer"
        if not (ours.exists() and peer.exists()):
            if kind == "plt":
                X, Y = collect_mlp_io(loaded.model, loaded.tokenizer, n_tokens)
                ts = fit_starter_set(X, Y, kind="plt", width=width, l0=l0, affine=True,
                                     model_name="gemma-3-270m")
            else:
                plt = load_transcoders(out / f"tc-plt-w{width}-l0_{l0}-gemmascope")
                g = torch.Generator().manual_seed(1)
                layers = {}
                for L, tc in plt.layers.items():
                    n_out = plt.n_layers - L
                    W_dec = 0.01 * torch.randn(tc.d_sae, n_out, tc.W_enc.shape[0], generator=g) / tc.d_sae ** 0.5
                    W_dec[:, 0] = tc.W_dec[:, 0]
                    layers[L] = LayerTranscoder(tc.W_enc.contiguous(), tc.b_enc.contiguous(),
                                                tc.threshold.contiguous(), W_dec, tc.b_dec.contiguous(), None)
                ts = TranscoderSet(kind="clt", n_layers=plt.n_layers, layers=layers,
                                   model_name="gemma-3-270m", source="", info={"synthetic": True})
            if not ours.exists():
                save_gemmascope(ts, ours, l0=l0)
            writer = write_circuit_tracer_plt if kind == "plt" else write_circuit_tracer_clt
            writer(peer, ts)
        sets[kind] = {"cltrace": str(ours), "peer": str(peer)}
    return sets


def prompts(out: Path, tokenizer, lengths: list[int]) -> dict:
    """{n: token-id file} with <bos> + (n-1) tokens of calibration text."""
    from cltrace.training.starter import calibration_texts

    ids: list[int] = []
    for text in calibration_texts():
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max(lengths):
            break
    bos = tokenizer.bos_token_id
    files = {}
    for n in lengths:
        f = out / f"prompt_{n}.pt"
        if not f.exists():
            torch.save(torch.tensor([bos] + ids[:n - 1]), f)
        files[n] = str(f)
    return files
