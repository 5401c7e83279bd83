#!/usr/bin/env python
"""Per-edge relative error of fp32 graphs against a float64 cltrace graph of the same case.

    python benchmarks/run_cltrace.py ... --dtype float64 --out out/cltrace64-plt-n64-m2048
    python benchmarks/compare_fp64.py out/cltrace64-plt-n64-m2048.safetensors \
        out/cltrace-plt-n64-m2048.safetensors out/peer-plt-n64-m2048.safetensors

Compares feature -> feature edges of the shared features (error and token columns are left
out: in float64 a few near-threshold JumpReLU features flip, which moves their decode into
the error node; the peer's token edges are scaled by 1/sqrt(d_model))."""
import sys
import torch
from safetensors.torch import load_file
ref = load_file(sys.argv[1])
for path in sys.argv[2:]:
    A = load_file(path)
    ka = {tuple(r): i for i, r in enumerate(A["features"].tolist())}
    kr = {tuple(r): i for i, r in enumerate(ref["features"].tolist())}
    shared = sorted(set(ka) & set(kr))
    ia = torch.tensor([ka[k] for k in shared]); ir = torch.tensor([kr[k] for k in shared])
    ea = A["edges"][ia][:, ia].double(); er = ref["edges"][ir][:, ir].double()
    m = er.abs().max()
    for frac in (1e-3, 1e-2):
        big = er.abs() > frac * m
        rel = ((ea - er).abs()[big] / er.abs()[big])
        print(f"{path}: shared {len(shared)}, max|a-r|/max|r| {((ea-er).abs().max()/m).item():.1e}; edges > {frac:g} max: {int(big.sum())}, max rel {rel.max().item():.1e}, 99.9th pct rel {rel.quantile(0.999).item():.1e}")
