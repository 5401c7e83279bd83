"""Numerics shared by the kernel tests (and any test that pins torch's threads): the devices
and dtypes to test, per-dtype tolerances, seeded random encoder and CSR inputs."""
from __future__ import annotations

import contextlib

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol relative to 1 + the largest |expected|) per dtype: float64 up to summation order;
# float32, bfloat16 and float16 as the dtype's rounding of a sum of products.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def assert_close_in(dtype: torch.dtype, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """assert_close in float64 on the CPU with TOL[dtype], atol scaled by 1 + max |expected|."""
    rtol, atol = TOL[dtype]
    expected = expected.detach().cpu().double()
    scale = 1.0 + (expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=rtol,
                               atol=atol * scale)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block at ``n`` torch threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encoder_inputs(n: int, d_in: int, d_sae: int, l0: int, *, dtype=torch.float64,
                   device="cpu", seed: int = 0):
    """x [n, d_in], W_enc [d_in, d_sae], b_enc, threshold calibrated to ~l0 active per row.

    Thresholds sit midway between two neighbouring order statistics of each feature's z,
    so no z lies closer than a safe margin to its threshold (finite differences stay
    valid and fp32 rounding cannot flip an entry)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    W = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in**0.5
    b = 0.1 * torch.randn(d_sae, generator=g, dtype=torch.float64)
    z = x @ W + b
    q = 1.0 - l0 / d_sae
    zs = z.sort(dim=0).values  # [n, d_sae]
    if n > 1:
        k = min(max(int(q * n), 0), n - 2)
        threshold = (zs[k] + zs[k + 1]) / 2
    else:  # one row: keep the l0 largest features
        top = z[0].sort(descending=True).values
        threshold = torch.full_like(z[0], float(top[l0 - 1] + top[min(l0, d_sae - 1)]) / 2)
        if l0 == d_sae:
            threshold = torch.full_like(z[0], float(top[-1]) - 1.0)
    threshold = threshold.clamp_min(1e-3)
    cast = dict(dtype=dtype, device=device)
    return x.to(**cast), W.to(**cast), b.to(**cast), threshold.to(**cast)


def csr_inputs(n: int, d_sae: int, max_per_row: int, *, dtype=torch.float64, device="cpu",
               seed: int = 0, duplicates: bool = False):
    """A random CSR (row_offsets, feat_idx, acts) with 0..max_per_row entries a row."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, max_per_row + 1, (n,), generator=g)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    feats = []
    for c in counts.tolist():
        if duplicates:
            feats.append(torch.randint(0, d_sae, (c,), generator=g).sort().values)
        else:
            feats.append(torch.randperm(d_sae, generator=g)[:c].sort().values)
    feat_idx = torch.cat(feats) if feats else torch.zeros(0, dtype=torch.int64)
    acts = torch.rand(int(offsets[-1]), generator=g, dtype=torch.float64) + 0.5
    return offsets.to(device), feat_idx.to(device), acts.to(dtype=dtype, device=device)
