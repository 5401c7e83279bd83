"""Benchmark cases: realistic inputs, our op and the best plain-torch alternatives, and the
roofline floor (minimum bytes moved, FLOPs) of each problem.

Inputs imitate a Gemma Scope transcoder on residual-stream activations:
- ``x = u * scale`` with ``u ~ N(0, I)`` and a log-normal per-dimension ``scale`` (an
  anisotropic residual stream); ``W_enc ~ N(0, 1/d_model)``, ``b_enc ~ N(0, 0.1^2)``.
- Each feature gets a firing rate ``p_f`` (log-normal, a few hot features and a long tail,
  summing to L0). Its JumpReLU threshold is the ``1 - p_f`` quantile of its pre-activation
  ``z_f = x . W_enc[:, f] + b_f``, which for such ``x`` is exactly Gaussian with std
  ``||scale * W_enc[:, f]||``: ``threshold_f = b_f + std_f * ndtri(1 - p_f)``. So each row has
  about L0 active features (the measured mean L0 is reported), with realistic frequency skew.
- Sparse activations for the decoder cases are drawn with the same per-feature rates
  (feature f active in a row with probability p_f; value threshold + Exp(1)).
Each impl has an optional ``prepare`` (its own input representation, e.g. the dense
activations a dense baseline needs): counted in peak memory, not in time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from cltrace import ops, reference

F32 = 4  # bytes per fp32 element
I64 = 8


@dataclass
class Impl:
    name: str
    run: Callable[[object], object]  # run(prepared) -> result
    prepare: Callable[[], object] = lambda: None


@dataclass
class Built:
    impls: list[Impl]  # ours first
    bytes: float  # roofline: minimum bytes any implementation must move
    flops: float  # roofline: FLOPs of the sparse problem
    info: dict = field(default_factory=dict)


# --- input generation ----------------------------------------------------------------------

def feature_rates(d_sae: int, L0: float, device) -> torch.Tensor:
    """Per-feature firing probabilities [d_sae], log-normal, summing to about L0."""
    r = torch.exp(1.0 * torch.randn(d_sae, device=device))
    return (r / r.sum() * L0).clamp_(max=0.5)


def encoder(d_model: int, d_sae: int, L0: float, device):
    """(W_enc [d_model, d_sae], b_enc [d_sae], threshold [d_sae], scale [d_model], rate)."""
    scale = torch.exp(0.5 * torch.randn(d_model, device=device))
    W_enc = torch.randn(d_model, d_sae, device=device).div_(math.sqrt(d_model))
    b_enc = 0.1 * torch.randn(d_sae, device=device)
    rate = feature_rates(d_sae, L0, device)
    std = torch.empty(d_sae, device=device)
    s2 = scale.square()
    for c in range(0, d_sae, 16384):  # std_f = ||scale * W_enc[:, f]||, in column chunks
        std[c:c + 16384] = (s2 @ W_enc[:, c:c + 16384].square()).sqrt()
    threshold = (b_enc + std * torch.special.ndtri(1 - rate)).clamp_(min=1e-3)
    return W_enc, b_enc, threshold, scale, rate


def residual(n: int, scale: torch.Tensor) -> torch.Tensor:
    """x [n, d_model] with per-dimension scale."""
    return torch.randn(n, scale.numel(), device=scale.device) * scale


def sample_csr(n_rows: int, d_sae: int, L0: float, device):
    """CSR activations (row_offsets [n+1], feat_idx [nnz], acts [nnz]) with about L0 per row."""
    rate = feature_rates(d_sae, L0, device)
    rows, feats = [], []
    for r0 in range(0, n_rows, 256):  # bounded [256, d_sae] temporaries
        m = torch.rand(min(256, n_rows - r0), d_sae, device=device) < rate
        r, f = m.nonzero(as_tuple=True)
        rows.append(r + r0)
        feats.append(f)
    rows, feats = torch.cat(rows), torch.cat(feats)
    ro = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
    ro[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    acts = 0.5 + torch.empty(feats.numel(), device=device).exponential_()
    return ro, feats, acts


def rows_of(ro: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(ro.numel() - 1, device=ro.device), ro.diff())


def densify(ro, fi, acts, d_sae) -> torch.Tensor:
    """Dense [N, d_sae] activations."""
    out = acts.new_zeros(ro.numel() - 1, d_sae)
    out[rows_of(ro), fi] = acts
    return out


def _csr_info(ro, fi) -> dict:
    n = ro.numel() - 1
    return {"nnz": int(fi.numel()), "mean_L0": round(fi.numel() / max(n, 1), 1),
            "distinct_features": int(torch.unique(fi).numel())}


# --- cases -----------------------------------------------------------------------------------

def build_encode(p: dict, device) -> Built:
    """JumpReLU encode: ours (tiled, sparse output) vs dense addmm + mask (+ sparse extraction)."""
    d, s, n = p["d_model"], p["d_sae"], p["N"]
    W, b, thr, scale, _ = encoder(d, s, p["L0"], device)
    x = residual(n, scale)

    def dense(_):
        z = torch.addmm(b, x, W)  # [N, d_sae]
        return z.mul_(z > thr)

    def dense_to_csr(_):
        z = torch.addmm(b, x, W)  # [N, d_sae]
        mask = z > thr
        rows, feats = mask.nonzero(as_tuple=True)
        ro = torch.zeros(n + 1, dtype=torch.int64, device=x.device)
        ro[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        return ro, feats, z[rows, feats]

    ro, fi, acts, _ = ops.jumprelu_encode(x, W, b, thr)
    nnz = fi.numel()
    info = _csr_info(ro, fi)
    bytes_ = F32 * (n * d + d * s + 2 * s) + nnz * (I64 + 2 * F32) + I64 * (n + 1)
    return Built([Impl("ours", lambda _: ops.jumprelu_encode(x, W, b, thr)),
                  Impl("dense addmm+mask", dense),
                  Impl("dense addmm+mask+to_csr", dense_to_csr)],
                 bytes_, 2.0 * n * d * s, info)


def build_decode(p: dict, device) -> Built:
    """Sparse decode: ours vs dense matmul, embedding_bag, gather + index_add_."""
    d, s, n, n_out = p["d_model"], p["d_sae"], p["N"], p.get("n_out", 1)
    W3 = torch.randn(s, n_out, d, device=device).div_(math.sqrt(d))  # [d_sae, n_out, d_model]
    W2 = W3.view(s, n_out * d)
    ro, fi, acts = sample_csr(n, s, p["L0"], device)
    D = n_out * d

    def gather_index_add(rows):
        out = W2.new_zeros(n, D)
        return out.index_add_(0, rows, W2[fi] * acts[:, None])

    info = _csr_info(ro, fi)
    nnz, uniq = info["nnz"], info["distinct_features"]
    bytes_ = F32 * uniq * D + nnz * (I64 + F32) + I64 * (n + 1) + F32 * n * D
    return Built([Impl("ours", lambda _: ops.sparse_decode(ro, fi, acts, W3)),
                  Impl("dense acts@W_dec", lambda a: a @ W2, lambda: densify(ro, fi, acts, s)),
                  Impl("embedding_bag", lambda _: F.embedding_bag(
                      fi, W2, ro, mode="sum", per_sample_weights=acts, include_last_offset=True)),
                  Impl("gather+index_add_", gather_index_add, lambda: rows_of(ro))],
                 bytes_, 2.0 * nnz * D, info)


def build_decode_backward(p: dict, device) -> Built:
    """sparse_decode_backward vs dense autograd of ``acts_dense @ W_dec`` and the gather twin."""
    d, s, n, n_out = p["d_model"], p["d_sae"], p["N"], p.get("n_out", 1)
    W3 = torch.randn(s, n_out, d, device=device).div_(math.sqrt(d))
    W2 = W3.view(s, n_out * d)
    ro, fi, acts = sample_csr(n, s, p["L0"], device)
    g3 = torch.randn(n, n_out, d, device=device)  # grad_out [N, n_out, d_model]
    D = n_out * d

    def dense_graph():
        a = densify(ro, fi, acts, s).requires_grad_()
        w = W2.detach().requires_grad_()
        return a, w, a @ w  # the forward graph autograd replays

    def dense_bwd(st):
        a, w, out = st
        return torch.autograd.grad(out, (a, w), g3.view(n, D), retain_graph=True)

    info = _csr_info(ro, fi)
    nnz, uniq = info["nnz"], info["distinct_features"]
    bytes_ = (F32 * (n * D + uniq * D + s * D) + nnz * (I64 + 2 * F32) + I64 * (n + 1))
    return Built([Impl("ours", lambda _: ops._ops.sparse_decode_backward(g3, ro, fi, acts, W3)),
                  Impl("dense autograd", dense_bwd, dense_graph),
                  Impl("gather+index_add_", lambda _: reference.sparse_decode_backward(
                      g3, ro, fi, acts, W3))],
                 bytes_, 4.0 * nnz * D, info)


def build_encode_backward(p: dict, device) -> Built:
    """jumprelu_encode_backward vs dense autograd of ``z = addmm(b, x, W); z * (z > thr)``."""
    d, s, n = p["d_model"], p["d_sae"], p["N"]
    W, b, thr, scale, _ = encoder(d, s, p["L0"], device)
    x = residual(n, scale)
    ro, fi, acts, pre = ops.jumprelu_encode(x, W, b, thr)
    grad_acts = torch.randn_like(acts)

    def dense_graph():
        xs, ws, bs = (t.detach().requires_grad_() for t in (x, W, b))
        z = torch.addmm(bs, xs, ws)
        out = z * (z > thr)
        g = densify(ro, fi, grad_acts, s)
        return xs, ws, bs, out, g

    def dense_bwd(st):
        xs, ws, bs, out, g = st
        return torch.autograd.grad(out, (xs, ws, bs), g, retain_graph=True)

    info = _csr_info(ro, fi)
    nnz, uniq = info["nnz"], info["distinct_features"]
    bytes_ = (F32 * (2 * n * d + uniq * d + d * s + 3 * s) + nnz * (I64 + 2 * F32)
              + I64 * (n + 1))
    return Built([Impl("ours", lambda _: ops._ops.jumprelu_encode_backward(
                      grad_acts, x, W, thr, ro, fi, pre, 0.0)),
                  Impl("dense autograd", dense_bwd, dense_graph)],
                 bytes_, 4.0 * nnz * d, info)


def build_contract(p: dict, device) -> Built:
    """attribution_contract vs gather-multiply-sum and a matmul per source position."""
    d, s, n_pos, B, n_out = p["d_model"], p["d_sae"], p["n_pos"], p["B"], p.get("n_out", 1)
    W3 = torch.randn(s, n_out, d, device=device).div_(math.sqrt(d))
    Wr = W3[:, n_out // 2, :]  # [d_sae, d_model]; strided rows for a CLT slice
    ro, fi, acts = sample_csr(n_pos, s, p["L0"], device)
    pos = rows_of(ro)  # [S] sources in position order, as the graph builder has them
    grad = torch.randn(B, n_pos, d, device=device)  # [B, n_pos, d_model]
    S = fi.numel()

    def per_position(bounds):
        out = grad.new_empty(B, S)
        for q in range(n_pos):
            s0, s1 = bounds[q], bounds[q + 1]
            if s1 > s0:
                torch.mm(grad[:, q, :], Wr[fi[s0:s1]].T, out=out[:, s0:s1])
        return out.mul_(acts)

    info = _csr_info(ro, fi)
    uniq = info["distinct_features"]
    bytes_ = F32 * (uniq * d + B * n_pos * d + B * S) + S * (2 * I64 + F32)
    return Built([Impl("ours", lambda _: ops.attribution_contract(grad, pos, Wr, fi, acts)),
                  Impl("gather*mul.sum", lambda _: reference.attribution_contract(
                      grad, pos, Wr, fi, acts)),
                  Impl("matmul per position", per_position, lambda: ro.tolist())],
                 bytes_, 2.0 * B * S * d, info)


BUILDERS = {"encode": build_encode, "decode": build_decode,
            "decode_backward": build_decode_backward, "encode_backward": build_encode_backward,
            "contract": build_contract}


def case_label(op: str, p: dict) -> str:
    parts = [f"d{p['d_model']}", f"s{p['d_sae'] // 1024}k"]
    if p.get("n_out", 1) > 1:
        parts.append(f"x{p['n_out']}L")
    if op == "contract":
        parts += [f"pos{p['n_pos']}", f"B{p['B']}"]
    else:
        parts.append(f"N{p['N']}")
    parts.append(f"L0={p['L0']}")
    return " ".join(parts)


def _c(op, quick=False, **p):
    return {"op": op, "quick": quick, "params": p}


# (op, params); quick=True ones form --quick.
CASES = [
    _c("encode", True, d_model=640, d_sae=16384, N=256, L0=64),
    _c("encode", d_model=640, d_sae=16384, N=1024, L0=64),
    _c("encode", d_model=640, d_sae=16384, N=1024, L0=150),
    _c("encode", d_model=2304, d_sae=16384, N=512, L0=64),
    _c("encode", d_model=640, d_sae=262144, N=64, L0=64),
    _c("encode", d_model=2304, d_sae=262144, N=64, L0=64),
    _c("decode", True, d_model=640, d_sae=16384, N=1024, L0=64),
    _c("decode", d_model=640, d_sae=16384, N=4096, L0=64),
    _c("decode", d_model=640, d_sae=16384, N=1024, L0=20),
    _c("decode", d_model=640, d_sae=16384, N=1024, L0=150),
    _c("decode", d_model=2304, d_sae=16384, N=1024, L0=64),
    _c("decode", True, d_model=640, d_sae=16384, n_out=18, N=64, L0=64),
    _c("decode", d_model=2304, d_sae=262144, N=64, L0=64),
    _c("decode_backward", True, d_model=640, d_sae=16384, N=256, L0=64),
    _c("decode_backward", d_model=640, d_sae=16384, N=1024, L0=64),
    _c("decode_backward", d_model=2304, d_sae=16384, N=512, L0=64),
    _c("decode_backward", d_model=640, d_sae=16384, n_out=18, N=64, L0=64),
    _c("encode_backward", True, d_model=640, d_sae=16384, N=256, L0=64),
    _c("encode_backward", d_model=640, d_sae=16384, N=1024, L0=64),
    _c("encode_backward", d_model=2304, d_sae=16384, N=512, L0=64),
    _c("encode_backward", d_model=640, d_sae=262144, N=64, L0=64),
    _c("contract", True, d_model=640, d_sae=16384, n_pos=64, B=32, L0=64),
    _c("contract", d_model=640, d_sae=16384, n_pos=128, B=64, L0=64),
    _c("contract", d_model=2304, d_sae=16384, n_pos=128, B=16, L0=64),
    _c("contract", d_model=640, d_sae=16384, n_out=18, n_pos=256, B=32, L0=64),
]
