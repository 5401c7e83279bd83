"""CUDA kernels of cltrace against the CPU ops and the pure-torch reference.

Collected everywhere, skipped without a CUDA device. For every op: random inputs, the CUDA
result against the CPU op and against :mod:`cltrace.reference` (float64: tight; float32,
bfloat16, float16: the tolerances in ``TOL``; for the encoders, entries may differ only where
the pre-activation lies within tolerance of the threshold / the k-th largest value), gradcheck
in float64 on CUDA for the differentiable ops, ``torch.library.opcheck``, edge cases and bad
input errors.

Setting CLTRACE_CUDA_TESTS_ON_CPU=1 runs the same tests with CPU tensors (the CUDA-only checks
are skipped): a way to check the tests themselves on a machine without a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch

import cltrace
from cltrace import ops
from cltrace import reference as ref

DEV = "cpu" if os.environ.get("CLTRACE_CUDA_TESTS_ON_CPU") else "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device"),
]
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="checks CUDA-specific behaviour")

_C = torch.ops.cltrace
F64 = torch.float64
# (rtol, atol relative to the largest magnitude of the expected tensor) per dtype.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
# Encoder entries this close to their threshold (relative to 1 + |z|) may differ across devices.
BOUNDARY = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
LOW = [torch.float32, torch.bfloat16, torch.float16]
ALL = [torch.float64, *LOW]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close on the CPU in float64 with the dtype's tolerance, atol scaled to the data."""
    rtol, atol = TOL[dtype]
    expected = expected.detach().cpu().to(F64)
    scale = 1.0 + (expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(actual.detach().cpu().to(F64), expected, rtol=rtol, atol=atol * scale)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _encoder(n, d_in, d_sae, dtype, seed=0, thr_lo=0.2, thr_hi=0.8):
    """x [n, d_in], W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae] on the CPU."""
    g = _gen(seed)
    x = torch.randn(n, d_in, generator=g, dtype=F64)
    W = torch.randn(d_in, d_sae, generator=g, dtype=F64) / d_in**0.5
    b = 0.1 * torch.randn(d_sae, generator=g, dtype=F64)
    thr = thr_lo + (thr_hi - thr_lo) * torch.rand(d_sae, generator=g, dtype=F64)
    return [t.to(dtype) for t in (x, W, b, thr)]


def _cuda(*ts):
    return [t.to(DEV) for t in ts]


def _check_csr(row_offsets, feat_idx, n, d_sae):
    """row_offsets from 0 to nnz, non-decreasing; features in range, ascending within rows."""
    ro, fi = row_offsets.cpu(), feat_idx.cpu()
    assert ro.dtype == torch.int64 and fi.dtype == torch.int64
    assert ro.shape == (n + 1,) and ro[0] == 0 and ro[-1] == fi.numel()
    assert (ro.diff() >= 0).all()
    if fi.numel():
        assert fi.min() >= 0 and fi.max() < d_sae
        rows = torch.repeat_interleave(torch.arange(n), ro.diff())
        same_row = rows[1:] == rows[:-1]
        assert (fi.diff()[same_row] > 0).all(), "features must ascend within a row"


def _dense(row_offsets, feat_idx, values, n, d_sae):
    return ops.SparseActs(row_offsets.cpu(), feat_idx.cpu(), values.cpu().to(F64)).to_dense(d_sae)


def _mask(row_offsets, feat_idx, n, d_sae):
    ones = torch.ones(feat_idx.numel(), dtype=F64)
    return _dense(row_offsets, feat_idx, ones, n, d_sae) > 0


# --- JumpReLU encode -------------------------------------------------------------------------

def _check_jumprelu(out, x, W, b, thr, bandwidth, dtype):
    """CUDA JumpReLU result against the float64 truth of the same (rounded) inputs."""
    n, d_sae = x.shape[0], W.shape[1]
    ro, fi, acts, pre = (t.cpu() for t in out)
    x, W, b, thr = (t.cpu() for t in (x, W, b, thr))
    _check_csr(ro, fi, n, d_sae)
    z = x.to(F64) @ W.to(F64) + b.to(F64)  # [n, d_sae]
    keep = (thr - bandwidth / 2 if bandwidth > 0 else thr).to(F64)  # in the data's dtype
    got = _mask(ro, fi, n, d_sae)
    want = z > keep
    near = (z - keep).abs() <= BOUNDARY[dtype] * (1 + z.abs())
    assert not ((got ^ want) & ~near).any(), "kept set differs away from the threshold"
    rows = ops.SparseActs(ro, fi, acts).rows()
    _close(pre, z[rows, fi], dtype)
    # acts = z * (z > threshold), decided on the op's own pre-activations (exact upcast).
    want_acts = torch.where(pre.to(F64) > thr[fi].to(F64), pre, torch.zeros_like(pre))
    assert torch.equal(acts, want_acts)


@pytest.mark.parametrize("bandwidth", [0.0, 0.3])
@pytest.mark.parametrize("n,d_in,d_sae", [(7, 32, 96), (1, 37, 53), (33, 64, 1000)])
def test_jumprelu_encode_float64_matches_cpu_and_reference(n, d_in, d_sae, bandwidth):
    args = _encoder(n, d_in, d_sae, F64, seed=n + d_sae)
    got = _C.jumprelu_encode(*_cuda(*args), bandwidth)
    cpu = _C.jumprelu_encode(*args, bandwidth)
    oracle = ref.jumprelu_encode(*args, bandwidth)
    for want in (cpu, oracle):
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        _close(got[2], want[2], F64)
        _close(got[3], want[3], F64)
    _check_jumprelu(got, *args, bandwidth, F64)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bandwidth", [0.0, 0.3])
def test_jumprelu_encode_low_precision(dtype, bandwidth):
    args = _cuda(*_encoder(19, 48, 300, dtype, seed=3))
    _check_jumprelu(_C.jumprelu_encode(*args, bandwidth), *args, bandwidth, dtype)


@pytest.mark.parametrize("n,d_in,d_sae", [
    (3, 16, 20000),   # two column tiles (16384 columns each), d_sae not a power of two
    (1100, 8, 40),    # two row blocks (1024 rows each)
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jumprelu_encode_tiles(n, d_in, d_sae, dtype):
    args = _encoder(n, d_in, d_sae, dtype, seed=5)
    got = _C.jumprelu_encode(*_cuda(*args), 0.0)
    _check_jumprelu(got, *_cuda(*args), 0.0, dtype)
    if dtype == F64:
        cpu = _C.jumprelu_encode(*args, 0.0)
        assert torch.equal(got[1].cpu(), cpu[1]) and torch.equal(got[0].cpu(), cpu[0])


def test_encoders_accept_a_transposed_W_enc():
    # circuit-tracer stores W_enc as [d_sae, d_in]; its transpose is a strided [d_in, d_sae] view.
    x, W, b, thr = _cuda(*_encoder(6, 20, 70, F64, seed=12))
    Wt = W.t().contiguous().t()
    assert not Wt.is_contiguous()
    for got, want in zip(_C.jumprelu_encode(x, Wt, b, thr, 0.0), _C.jumprelu_encode(x, W, b, thr, 0.0)):
        _close(got, want, F64)
    for got, want in zip(_C.topk_encode(x, Wt, b, 5), _C.topk_encode(x, W, b, 5)):
        _close(got, want, F64)
    ro, fi, _acts, pre = _C.jumprelu_encode(x, W, b, thr, 0.0)
    grad = torch.randn_like(pre)
    for got, want in zip(_C.jumprelu_encode_backward(grad, x, Wt, thr, ro, fi, pre, 0.0),
                         _C.jumprelu_encode_backward(grad, x, W, thr, ro, fi, pre, 0.0)):
        _close(got, want, F64)


def test_jumprelu_encode_no_active_feature():
    x, W, b, thr = _cuda(*_encoder(5, 16, 40, F64))
    ro, fi, acts, pre = _C.jumprelu_encode(x, W, b, thr + 1e6, 0.0)
    assert ro.tolist() == [0] * 6 and fi.numel() == acts.numel() == pre.numel() == 0
    assert ro.device.type == fi.device.type == acts.device.type == DEV


def test_jumprelu_encode_all_active_overflows_pool():
    # 64 rows x 2048 features all kept: more than the pool's first guess (64 * 512 + 65536),
    # so the tiles are recomputed with an exact pool.
    x, W, b, thr = _encoder(64, 8, 2048, F64, seed=9)
    got = _C.jumprelu_encode(*_cuda(x, W, b, thr - 1e6), 0.0)
    assert got[0].cpu().tolist() == [2048 * i for i in range(65)]
    assert torch.equal(got[1].cpu(), torch.arange(2048).repeat(64))
    _close(got[3], (x @ W + b).reshape(-1), F64)
    _close(got[2], got[3], F64)


def test_jumprelu_encode_empty_batch():
    x, W, b, thr = _cuda(*_encoder(0, 8, 16, torch.float32))
    ro, fi, acts, _ = _C.jumprelu_encode(x, W, b, thr, 0.0)
    assert ro.tolist() == [0] and fi.numel() == 0 and acts.numel() == 0


# --- TopK encode -----------------------------------------------------------------------------

def _check_topk(out, x, W, b, k, dtype):
    n, d_sae = x.shape[0], W.shape[1]
    ro, fi, acts = (t.cpu() for t in out)
    _check_csr(ro, fi, n, d_sae)
    assert torch.equal(ro, torch.arange(n + 1) * k)
    z = x.cpu().to(F64) @ W.cpu().to(F64) + b.cpu().to(F64)
    picked = z.gather(1, fi.view(n, k)).sort(1, descending=True).values
    best = z.topk(k, 1).values
    _close(picked, best, dtype)  # the selection is a top-k set up to near-ties
    _close(acts.view(n, k), z.gather(1, fi.view(n, k)).relu(), dtype)


@pytest.mark.parametrize("n,d_in,d_sae,k", [(9, 32, 100, 7), (1, 37, 53, 1), (4, 16, 24, 24)])
def test_topk_encode_float64_matches_cpu_and_reference(n, d_in, d_sae, k):
    x, W, b, _ = _encoder(n, d_in, d_sae, F64, seed=k)
    got = _C.topk_encode(*_cuda(x, W, b), k)
    for want in (_C.topk_encode(x, W, b, k), ref.topk_encode(x, W, b, k)):
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        _close(got[2], want[2], F64)


@pytest.mark.parametrize("dtype", LOW)
def test_topk_encode_low_precision(dtype):
    x, W, b, _ = _cuda(*_encoder(11, 40, 500, dtype, seed=2))
    _check_topk(_C.topk_encode(x, W, b, 16), x, W, b, 16, dtype)


def test_topk_encode_bad_k():
    x, W, b, _ = _cuda(*_encoder(2, 8, 10, torch.float32))
    with pytest.raises(RuntimeError, match="k must be in"):
        _C.topk_encode(x, W, b, 11)


# --- Encoder backward ------------------------------------------------------------------------

def _backward_case(dtype, n=13, d_in=24, d_sae=150, bandwidth=0.4, seed=4):
    """A JumpReLU CSR (computed on the CPU in float64) plus a random grad_acts, cast to dtype."""
    args = _encoder(n, d_in, d_sae, F64, seed=seed)
    ro, fi, _acts, pre = _C.jumprelu_encode(*args, bandwidth)
    grad = torch.randn(fi.numel(), generator=_gen(seed + 1), dtype=F64)
    x, W, _b, thr = args
    return [t.to(dtype) for t in (grad, x, W, thr)] + [ro, fi, pre.to(dtype)]


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("bandwidth", [0.0, 0.4])
def test_jumprelu_encode_backward(dtype, bandwidth):
    grad, x, W, thr, ro, fi, pre = _backward_case(dtype, bandwidth=0.4)
    got = _C.jumprelu_encode_backward(*_cuda(grad, x, W, thr, ro, fi, pre), bandwidth)
    for g in got:
        assert g.dtype == dtype and g.device.type == DEV
    # Against the CPU op in the same dtype (same band decisions, made in that dtype) ...
    cpu = _C.jumprelu_encode_backward(grad, x, W, thr, ro, fi, pre, bandwidth)
    for g, w in zip(got, cpu):
        _close(g, w, dtype)
    # ... and the float64 truth; in low precision the band test |z - threshold| < bandwidth/2
    # may round differently at the band's edge, so grad_threshold is compared in float64 only.
    up = [t.to(F64) if t.is_floating_point() else t for t in (grad, x, W, thr, ro, fi, pre)]
    want = ref.jumprelu_encode_backward(*up, bandwidth)
    n_cmp = 4 if dtype == F64 or bandwidth == 0 else 3
    for g, w in list(zip(got, want))[:n_cmp]:
        _close(g, w, dtype)


@pytest.mark.parametrize("dtype", ALL)
def test_topk_encode_backward(dtype):
    x, W, b, _ = _encoder(10, 20, 90, F64, seed=8)
    ro, fi, acts = _C.topk_encode(x, W, b, 9)
    grad = torch.randn(fi.numel(), generator=_gen(1), dtype=F64)
    args = [grad.to(dtype), x.to(dtype), W.to(dtype), ro, fi, acts.to(dtype)]
    got = _C.topk_encode_backward(*_cuda(*args))
    up = [t.to(F64) if t.is_floating_point() else t for t in args]
    wants = [ref.topk_encode_backward(*up)]
    if dtype == F64:
        wants.append(_C.topk_encode_backward(*args))
    for want in wants:
        for g, w in zip(got, want):
            _close(g, w, dtype)


def test_encoder_backward_empty_rows():
    # Rows without entries and features without entries get zero gradients.
    x, W, _b, thr = _cuda(*_encoder(4, 6, 10, F64))
    ro = torch.tensor([0, 0, 2, 2, 3], device=DEV)
    fi = torch.tensor([1, 7, 7], device=DEV)
    grad = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=DEV)
    pre = thr[fi] + 1.0
    got = _C.jumprelu_encode_backward(grad, x, W, thr, ro, fi, pre, 0.0)
    want = ref.jumprelu_encode_backward(grad, x, W, thr, ro, fi, pre, 0.0)
    for g, w in zip(got, want):
        _close(g, w, F64)


# --- Sparse decode ---------------------------------------------------------------------------

def _decode_case(n, d_sae, n_out, d_model, dtype, seed=0, per_row=5, dup=True):
    g = _gen(seed)
    counts = torch.randint(1, per_row + 1, (n,), generator=g)
    if n > 1:
        counts[0] = 0  # an empty row
    ro = torch.zeros(n + 1, dtype=torch.int64)
    ro[1:] = counts.cumsum(0)
    fi = torch.randint(0, d_sae, (int(ro[-1]),), generator=g)
    if dup and fi.numel() > 3:
        fi[1] = fi[0]  # a repeated feature (within a row or across rows)
        fi[-1] = fi[0]
    acts = torch.randn(fi.numel(), generator=g, dtype=F64).to(dtype)
    W = torch.randn(d_sae, n_out, d_model, generator=g, dtype=F64).to(dtype)
    return ro, fi, acts, W


DECODE_SHAPES = [(6, 40, 1, 64), (5, 30, 3, 51), (1, 7, 1, 8), (9, 300, 2, 1000)]


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("n,d_sae,n_out,d_model", DECODE_SHAPES)
def test_sparse_decode(n, d_sae, n_out, d_model, dtype):
    ro, fi, acts, W = _decode_case(n, d_sae, n_out, d_model, dtype, seed=n)
    got = _C.sparse_decode(*_cuda(ro, fi, acts, W))
    assert got.shape == (n, n_out, d_model) and got.dtype == dtype
    _close(got, ref.sparse_decode(ro, fi, acts.to(F64), W.to(F64)), dtype)
    if dtype == F64:
        _close(got, _C.sparse_decode(ro, fi, acts, W), dtype)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("n,d_sae,n_out,d_model", DECODE_SHAPES)
def test_sparse_decode_backward(n, d_sae, n_out, d_model, dtype):
    ro, fi, acts, W = _decode_case(n, d_sae, n_out, d_model, dtype, seed=n + 1)
    grad_out = torch.randn(n, n_out, d_model, generator=_gen(7), dtype=F64).to(dtype)
    got = _C.sparse_decode_backward(*_cuda(grad_out, ro, fi, acts, W))
    up = [t.to(F64) for t in (grad_out, acts, W)]
    want = ref.sparse_decode_backward(up[0], ro, fi, up[1], up[2])
    for g, w in zip(got, want):
        _close(g, w, dtype)
    if dtype == F64:
        for g, w in zip(got, _C.sparse_decode_backward(grad_out, ro, fi, acts, W)):
            _close(g, w, dtype)


def test_sparse_decode_unaligned_and_strided_inputs():
    # An offset view (W_dec[1:]) breaks 16-byte alignment; non-contiguous acts are copied.
    ro, fi, acts, _ = _decode_case(5, 21, 1, 64, torch.float32, seed=3)
    W_off = torch.randn(21 * 64 + 1, generator=_gen(2)).to(DEV)[1:].view(21, 1, 64)
    assert W_off.data_ptr() % 16 != 0
    acts2 = torch.stack([acts, acts], 1).to(DEV)[:, 1]
    got = _C.sparse_decode(ro.to(DEV), fi.to(DEV), acts2, W_off)
    _close(got, ref.sparse_decode(ro, fi, acts.to(F64), W_off.cpu().to(F64)), torch.float32)
    grad_out = torch.randn(5, 1, 64, device=DEV)
    got_b = _C.sparse_decode_backward(grad_out, ro.to(DEV), fi.to(DEV), acts2, W_off)
    want_b = ref.sparse_decode_backward(grad_out.cpu().to(F64), ro, fi, acts.to(F64),
                                        W_off.cpu().to(F64))
    for g, w in zip(got_b, want_b):
        _close(g, w, torch.float32)


def test_sparse_decode_empty():
    ro = torch.zeros(4, dtype=torch.int64, device=DEV)
    fi = torch.zeros(0, dtype=torch.int64, device=DEV)
    acts = torch.zeros(0, device=DEV)
    W = torch.randn(10, 2, 8, device=DEV)
    assert torch.equal(_C.sparse_decode(ro, fi, acts, W), torch.zeros(3, 2, 8, device=DEV))
    ga, gW = _C.sparse_decode_backward(torch.randn(3, 2, 8, device=DEV), ro, fi, acts, W)
    assert ga.numel() == 0 and torch.equal(gW, torch.zeros_like(W))


# --- Attribution contraction and column gather -----------------------------------------------

def _contract_case(B, n_pos, d, S, n_rows, dtype, seed=0):
    g = _gen(seed)
    grad = torch.randn(B, n_pos, d, generator=g, dtype=F64).to(dtype)
    pos = torch.randint(0, n_pos, (S,), generator=g).sort().values
    fi = torch.randint(0, n_rows, (S,), generator=g)
    if S > 2:
        fi[1] = fi[0]  # duplicate feature
        pos[1] = pos[0]
    acts = torch.randn(S, generator=g, dtype=F64).to(dtype)
    W = torch.randn(n_rows, d, generator=g, dtype=F64).to(dtype)
    return grad, pos, W, fi, acts


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("B,n_pos,d,S,n_rows", [
    (3, 5, 64, 20, 50), (1, 1, 51, 1, 3), (12, 7, 640, 40, 200),
    (2, 4, 7000, 9, 12),  # float64 rows over 48 KiB: read from global memory, not shared
])
def test_attribution_contract(B, n_pos, d, S, n_rows, dtype):
    grad, pos, W, fi, acts = _contract_case(B, n_pos, d, S, n_rows, dtype, seed=d)
    got = _C.attribution_contract(*_cuda(grad, pos, W, fi, acts))
    assert got.shape == (B, S) and got.dtype == dtype
    up = [t.to(F64) for t in (grad, W, acts)]
    _close(got, ref.attribution_contract(up[0], pos, up[1], fi, up[2]), dtype)
    if dtype == F64:
        _close(got, _C.attribution_contract(grad, pos, W, fi, acts), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("o,d", [(0, 64), (2, 64), (1, 51)])
def test_attribution_contract_strided_clt_slice(o, d, dtype):
    # A cross-layer decoder [d_sae, n_out, d_model] sliced at output layer o: row stride
    # n_out * d_model, element stride 1 (odd d makes the rows unaligned for vector loads).
    grad, pos, _, fi, acts = _contract_case(4, 6, d, 25, 30, dtype, seed=o)
    W_clt = torch.randn(30, 3, d, generator=_gen(11), dtype=F64).to(dtype)
    W_slice = W_clt.to(DEV)[:, o, :]
    assert W_slice.stride() == (3 * d, 1)
    got = _C.attribution_contract(grad.to(DEV), pos.to(DEV), W_slice, fi.to(DEV), acts.to(DEV))
    want = ref.attribution_contract(grad.to(F64), pos, W_clt[:, o, :].to(F64), fi, acts.to(F64))
    _close(got, want, dtype)
    # A column-strided W_dec (stride(1) != 1) is copied first and gives the same edges.
    Wt = W_clt[:, o, :].to(DEV).t().contiguous().t()
    _close(_C.attribution_contract(grad.to(DEV), pos.to(DEV), Wt, fi.to(DEV), acts.to(DEV)),
           want, dtype)


def test_attribution_contract_no_sources():
    grad = torch.randn(3, 4, 8, device=DEV)
    empty = torch.zeros(0, dtype=torch.int64, device=DEV)
    out = _C.attribution_contract(grad, empty, torch.randn(5, 8, device=DEV), empty,
                                  torch.zeros(0, device=DEV))
    assert out.shape == (3, 0)


@pytest.mark.parametrize("dtype", ALL)
@pytest.mark.parametrize("d_in,d_sae,T", [(64, 100, 10), (37, 53, 70), (1, 5, 1), (640, 3000, 33)])
def test_gather_columns(d_in, d_sae, T, dtype):
    W = torch.randn(d_in, d_sae, generator=_gen(T), dtype=F64).to(dtype)
    fi = torch.randint(0, d_sae, (T,), generator=_gen(T + 1))
    fi[-1] = fi[0]  # duplicate
    got = _C.gather_columns(W.to(DEV), fi.to(DEV))
    assert torch.equal(got.cpu(), ref.gather_columns(W, fi))
    assert torch.equal(got.cpu(), _C.gather_columns(W, fi))
    empty = _C.gather_columns(W.to(DEV), fi[:0].to(DEV))
    assert empty.shape == (0, d_in)


# --- gradcheck (float64, CUDA) ---------------------------------------------------------------

def _away_from_boundaries(z, edges, margin=1e-3):
    return bool(((z - edges).abs() > margin).all())


def test_gradcheck_jumprelu_encode():
    for seed in range(100):  # inputs whose z stay clear of the thresholds under perturbation
        x, W, b, thr = _encoder(4, 6, 12, F64, seed=seed, thr_lo=0.0, thr_hi=0.6)
        if _away_from_boundaries(x @ W + b, thr):
            break
    x, W, b, thr = (t.to(DEV).requires_grad_() for t in (x, W, b, thr))
    assert ops.jumprelu_encode(x, W, b, thr).acts.numel() > 0
    assert torch.autograd.gradcheck(lambda *a: ops.jumprelu_encode(*a).acts, (x, W, b, thr))


def test_gradcheck_topk_encode():
    for seed in range(100):  # no near-ties at the k-th value, no values near 0
        x, W, b, _ = _encoder(3, 5, 10, F64, seed=seed)
        z = (x @ W + b).sort(1, descending=True).values
        if (z[:, 3] - z[:, 4]).min() > 1e-3 and z.abs().min() > 1e-3:
            break
    x, W, b = (t.to(DEV).requires_grad_() for t in (x, W, b))
    assert torch.autograd.gradcheck(lambda *a: ops.topk_encode(*a, 4).acts, (x, W, b))


def test_gradcheck_sparse_decode():
    ro, fi, acts, W = _decode_case(4, 9, 2, 5, F64, seed=1)
    acts, W = (t.to(DEV).requires_grad_() for t in (acts, W))
    ro, fi = ro.to(DEV), fi.to(DEV)
    assert torch.autograd.gradcheck(lambda a, w: ops.sparse_decode(ro, fi, a, w), (acts, W))


# --- opcheck ---------------------------------------------------------------------------------

def _opcheck(op, args, grad_args=None):
    """Full opcheck; with grad_args (inputs requiring grad) also the autograd checks, leaving out
    test_aot_dispatch_dynamic for the encoders: their int64 CSR outputs make it fail the same
    way on the CPU ("result type Float can't be cast to the desired output type Long")."""
    torch.library.opcheck(op, args)
    if grad_args is not None:
        torch.library.opcheck(op, grad_args, test_utils=(
            "test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck():
    x, W, b, thr = _cuda(*_encoder(5, 12, 30, torch.float32))
    xg = x.clone().requires_grad_()
    ro, fi, acts, pre = _C.jumprelu_encode(x, W, b, thr, 0.2)
    _opcheck(_C.jumprelu_encode.default, (x, W, b, thr, 0.2), (xg, W, b, thr, 0.2))
    _opcheck(_C.jumprelu_encode_backward.default, (acts, x, W, thr, ro, fi, pre, 0.2))
    tro, tfi, tacts = _C.topk_encode(x, W, b, 4)
    _opcheck(_C.topk_encode.default, (x, W, b, 4), (xg, W, b, 4))
    _opcheck(_C.topk_encode_backward.default, (tacts, x, W, tro, tfi, tacts))
    Wd = torch.randn(30, 2, 16, device=DEV)
    _opcheck(_C.sparse_decode.default, (ro, fi, acts, Wd),
             (ro, fi, acts.clone().requires_grad_(), Wd.clone().requires_grad_()))
    _opcheck(_C.sparse_decode_backward.default, (torch.randn(5, 2, 16, device=DEV), ro, fi, acts, Wd))
    grad = torch.randn(3, 5, 16, device=DEV)
    rows = ops.SparseActs(ro, fi, acts).rows()
    _opcheck(_C.attribution_contract.default, (grad, rows, Wd[:, 1, :], fi, acts))
    _opcheck(_C.gather_columns.default, (W, fi))


# --- bad inputs ------------------------------------------------------------------------------

@cuda_only
def test_mixed_devices_are_rejected():
    x, W, b, thr = _encoder(3, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        _C.jumprelu_encode(x.to(DEV), W, b.to(DEV), thr.to(DEV), 0.0)
    with pytest.raises(RuntimeError, match="is on"):
        _C.topk_encode(x.to(DEV), W.to(DEV), b, 2)
    ro, fi, acts, Wd = _decode_case(4, 10, 1, 8, torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        _C.sparse_decode(ro, fi, acts.to(DEV), Wd.to(DEV))
    grad, pos, Wc, fic, actsc = _contract_case(2, 3, 8, 4, 6, torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        _C.attribution_contract(grad.to(DEV), pos, Wc.to(DEV), fic.to(DEV), actsc.to(DEV))
    with pytest.raises(RuntimeError, match="is on"):
        _C.gather_columns(W.to(DEV), fi)


def test_out_of_range_indices_raise_not_crash():
    ro, fi, acts, W = _cuda(*_decode_case(4, 10, 1, 8, torch.float32, seed=2))
    assert fi.numel() > 0
    bad = fi.clone()
    bad[-1] = 10
    with pytest.raises(RuntimeError, match="out of range"):
        _C.sparse_decode(ro, bad, acts, W)
    with pytest.raises(RuntimeError, match="row_offsets"):
        _C.sparse_decode(ro + 1, fi, acts, W)
    with pytest.raises(RuntimeError, match="out of range"):
        _C.gather_columns(torch.randn(4, 10, device=DEV), bad)
    grad = torch.randn(2, 3, 8, device=DEV)
    pos = torch.zeros_like(fi)
    with pytest.raises(RuntimeError, match="out of range"):
        _C.attribution_contract(grad, pos + 3, W[:, 0, :], fi, acts)
    with pytest.raises(RuntimeError, match="out of range"):
        _C.attribution_contract(grad, pos, W[:, 0, :], bad, acts)
    if DEV == "cuda":
        torch.cuda.synchronize()  # the context is still usable: no device-side assert fired
    assert torch.ones(1, device=DEV).item() == 1.0


def test_wrong_dtypes_and_shapes_are_rejected():
    x, W, b, thr = _cuda(*_encoder(3, 8, 16, torch.float32))
    with pytest.raises(RuntimeError, match="dtype"):
        _C.jumprelu_encode(x, W.double(), b, thr, 0.0)
    with pytest.raises(RuntimeError, match="d_in"):
        _C.jumprelu_encode(x, W.t().contiguous(), b, thr, 0.0)
    with pytest.raises(RuntimeError, match="bandwidth"):
        _C.jumprelu_encode(x, W, b, thr, -1.0)
    ro, fi, acts, Wd = _cuda(*_decode_case(4, 10, 1, 8, torch.float32))
    with pytest.raises(RuntimeError, match="int64"):
        _C.sparse_decode(ro.int(), fi, acts, Wd)
    with pytest.raises(RuntimeError, match="grad_out"):
        _C.sparse_decode_backward(torch.randn(5, 1, 8, device=DEV), ro, fi, acts, Wd)


@cuda_only
def test_build_reports_cuda():
    assert cltrace.build_info().cuda_available, "cltrace._C was built without its CUDA kernels"
