"""What a full NaN/inf scan of a memory-mapped transcoder set costs (``verify="all"``).

Writes one Gemma Scope 2 layer of the 262k-wide shape for Gemma 3 270M (W_enc [640, 262144],
W_dec [262144, 640], float32: 1.34 GB) to a temporary folder, loads it memory-mapped, and
times the encoder scan (the default at load) and the decoder scan (``verify="all"``), page
cache warm (a second pass) and cold where the OS lets us drop it. The floor is the bytes read
at the machine's measured copy bandwidth. A full 18-layer 262k set is 18x one layer.

    python -m benchmarks.kernels.bench_verify [--width 262144] [--d-model 640]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import measure_machine, peak_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=262144)
    ap.add_argument("--d-model", type=int, default=640)
    a = ap.parse_args()
    from safetensors.torch import save_file

    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.checks import check_finite

    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp) / "layer_0_width_262k_l0_small"
        layer.mkdir()
        g = torch.Generator().manual_seed(0)
        d, w = a.d_model, a.width
        save_file({"w_enc": torch.randn(d, w, generator=g), "w_dec": torch.randn(w, d, generator=g),
                   "b_enc": torch.zeros(w), "b_dec": torch.zeros(d), "threshold": torch.ones(w)},
                  str(layer / "params.safetensors"))
        (layer / "config.json").write_text(json.dumps({"width": w, "architecture": "jump_relu", "l0": 32,
                                                        "model_name": "gemma-3-270m", "type": "transcoder"}))
        ts = load_transcoders(layer, verify="none")
        tc = ts.layers[0]
        nbytes = {"encoder": tc.W_enc.numel() * 4, "decoder": tc.W_dec.numel() * 4}
        copy_gbs = measure_machine("cpu").copy_gbs  # bytes read + written per second
        out = {"width": w, "d_model": d, "bytes": nbytes, "copy_GBps": round(copy_gbs, 2),
               "load_avg": os.getloadavg()}
        for level, key in (("encoder", "encoder"), ("all", "decoder")):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                check_finite(tc, level, "bench")
                times.append(time.perf_counter() - t0)
            scanned = nbytes["encoder"] + (nbytes["decoder"] if level == "all" else 0)
            out[f"verify_{level}"] = {"first_s": round(times[0], 3), "warm_s": round(times[1], 3),
                                      "GBps_warm": round(scanned / times[1] / 1e9, 2),
                                      "floor_s": round(scanned / (copy_gbs * 1e9), 3)}  # bytes read at the copy rate
        out["peak_rss_mib"] = round(peak_rss_mib())
        out["full_270m_set_all_s_estimate"] = round(18 * out["verify_all"]["warm_s"], 1)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
