"""Sparse JumpReLU / TopK encoders against the pure-torch reference, gradients, edge cases;
on CUDA also against the CPU op (tests marked cuda)."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
from support.numerics import FLOATS, assert_close_in, encoder_inputs

# Tolerances on values relative to max |z|: fp64 exact up to summation order, fp32 and bf16
# as the dtype's rounding of a d_in-term dot product.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}
F64 = torch.float64
LOW = [torch.float32, torch.bfloat16, torch.float16]
# Entries whose pre-activation lies this close to the threshold (relative to 1 + |z|) may be
# decided either way in a low-precision dtype.
BOUNDARY = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}
bwd_jumprelu = torch.ops.cltrace.jumprelu_encode_backward
bwd_topk = torch.ops.cltrace.topk_encode_backward


def assert_sparse_close(ours, theirs, dtype):
    """Same CSR structure and values, up to the dtype's tolerance."""
    assert torch.equal(ours[0].cpu(), theirs[0].cpu()), "row_offsets differ"
    assert torch.equal(ours[1].cpu(), theirs[1].cpu()), "feat_idx differ"
    scale = max(1.0, float(theirs[2].abs().max())) if theirs[2].numel() else 1.0
    for a, b in zip(ours[2:], theirs[2:]):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=0,
                                   atol=TOL[dtype] * scale)


def assert_valid_csr(row_offsets, feat_idx, n, d_sae):
    """int64; row_offsets from 0 to nnz, non-decreasing; features in range, ascending in a row."""
    ro, fi = row_offsets.cpu(), feat_idx.cpu()
    assert ro.dtype == torch.int64 and fi.dtype == torch.int64
    assert ro.shape == (n + 1,) and ro[0] == 0 and ro[-1] == fi.numel()
    assert (ro.diff() >= 0).all()
    if fi.numel():
        assert fi.min() >= 0 and fi.max() < d_sae
        same_row = ops.SparseActs(ro, fi, fi).rows().diff() == 0
        assert (fi.diff()[same_row] > 0).all(), "features must ascend within a row"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d_in,d_sae,l0", [(1, 16, 64, 5), (37, 24, 300, 20), (5, 7, 33, 33)])
def test_jumprelu_matches_reference(device, dtype, n, d_in, d_sae, l0):
    x, W, b, t = encoder_inputs(n, d_in, d_sae, l0, dtype=dtype, device=device)
    out = ops.jumprelu_encode(x, W, b, t)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t), dtype)
    assert (out.acts > 0).all() and torch.equal(out.acts, out.pre_acts)


@pytest.mark.parametrize("n,d_in,d_sae,dtype", [
    (300, 8, 9000, F64),  # CPU: more rows than one row block (256), columns than a tile (8192)
    (3, 16, 20000, F64), (3, 16, 20000, torch.float32),  # CUDA: two column tiles (16384 each)
    (1100, 8, 40, F64), (1100, 8, 40, torch.float32),  # CUDA: two row blocks (1024 rows each)
])
def test_jumprelu_tiles_rows_and_columns(device, n, d_in, d_sae, dtype):
    x, W, b, t = encoder_inputs(n, d_in, d_sae, 30, dtype=dtype, device=device, seed=5)
    out = ops.jumprelu_encode(x, W, b, t)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t), dtype)
    # entries in the last tile of columns and the last block of rows
    tile = 16384 if d_sae > 16384 else 8192
    assert d_sae <= tile or out.feat_idx.max() >= tile
    assert out.row_offsets[-1] > out.row_offsets[min(n - 1, 1024)]


def test_jumprelu_bf16_agrees_up_to_threshold_ties(device):
    x, W, b, t = encoder_inputs(64, 32, 256, 16, dtype=torch.bfloat16, device=device)
    ours = ops.jumprelu_encode(x, W, b, t).to_dense(256).float().cpu()
    theirs = ref.jumprelu_encode(x, W, b, t)
    theirs = ops.SparseActs(*theirs).to_dense(256).float().cpu()
    # Entries may only disagree where z is within bf16 rounding of the threshold.
    z = (x.float() @ W.float() + b.float()).cpu()
    near = (z - t.float().cpu()).abs() < 0.05 * z.abs().clamp_min(1)
    assert ((ours != 0) != (theirs != 0))[~near].sum() == 0
    both = (ours != 0) & (theirs != 0)
    torch.testing.assert_close(ours[both], theirs[both], rtol=2e-2, atol=2e-2)


def test_jumprelu_band_keeps_near_threshold_entries(device):
    x, W, b, t = encoder_inputs(40, 16, 128, 10, device=device)
    bw = 0.5
    out = ops.jumprelu_encode(x, W, b, t, bandwidth=bw)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t, bandwidth=bw), torch.float64)
    theta = t[out.feat_idx]
    assert (out.pre_acts > theta - bw / 2).all()
    inactive = out.pre_acts <= theta
    assert inactive.any(), "the band should hold some inactive entries"
    assert (out.acts[inactive] == 0).all()
    strict = ops.jumprelu_encode(x, W, b, t)
    assert out.acts.count_nonzero() == strict.acts.numel()


def test_jumprelu_no_and_all_active(device):
    x, W, b, t = encoder_inputs(6, 8, 20, 3, device=device)
    none = ops.jumprelu_encode(x, W, b, torch.full_like(t, 1e9))
    assert none.feat_idx.numel() == 0 and (none.row_offsets == 0).all()
    assert none.acts.numel() == none.pre_acts.numel() == 0
    assert {v.device.type for v in none} == {torch.device(device).type}
    every = ops.jumprelu_encode(x, W, b, torch.full_like(t, -1e9))
    assert every.feat_idx.numel() == 6 * 20
    assert torch.equal(every.feat_idx.cpu(), torch.arange(20).repeat(6))
    empty = ops.jumprelu_encode(x[:0], W, b, t)
    assert empty.row_offsets.tolist() == [0] and empty.acts.numel() == 0


def test_jumprelu_all_active_overflows_the_first_pool(device):
    # 64 rows x 2048 features all kept: more than the CUDA pool's first guess (64 * 512 + 65536),
    # so the tiles are recomputed with an exact pool.
    x, W, b, t = encoder_inputs(64, 8, 2048, 16, device=device, seed=9)
    out = ops.jumprelu_encode(x, W, b, t - 1e6)
    assert out.row_offsets.tolist() == [2048 * i for i in range(65)]
    assert torch.equal(out.feat_idx.cpu(), torch.arange(2048).repeat(64))
    assert_close_in(F64, out.pre_acts, (x @ W + b).reshape(-1))
    assert torch.equal(out.acts, out.pre_acts)


@pytest.mark.parametrize("bandwidth", [0.0, 0.3])
@pytest.mark.parametrize("dtype", LOW)
def test_jumprelu_low_precision_against_float64_truth(device, dtype, bandwidth):
    # The kept set of the float64 truth on the same (rounded) inputs, except within rounding of
    # the threshold; acts = pre_acts where pre_acts > threshold, decided on the op's own values.
    x, W, b, t = encoder_inputs(19, 48, 300, 20, dtype=dtype, device=device, seed=3)
    out = ops.jumprelu_encode(x, W, b, t, bandwidth=bandwidth)
    assert_valid_csr(out.row_offsets, out.feat_idx, 19, 300)
    x, W, b, t = (v.cpu() for v in (x, W, b, t))
    ro, fi, acts, pre = (v.cpu() for v in out)
    z = x.double() @ W.double() + b.double()  # [n, d_sae]
    keep = (t - bandwidth / 2 if bandwidth > 0 else t).double()  # the band's edge in dtype
    got = ops.SparseActs(ro, fi, torch.ones(fi.numel(), dtype=F64)).to_dense(300) > 0
    near = (z - keep).abs() <= BOUNDARY[dtype] * (1 + z.abs())
    assert not ((got ^ (z > keep)) & ~near).any(), "kept set differs away from the threshold"
    assert_close_in(dtype, pre, z[ops.SparseActs(ro, fi, acts).rows(), fi])
    assert torch.equal(acts, torch.where(pre.double() > t[fi].double(), pre, torch.zeros_like(pre)))


def test_encoders_accept_a_transposed_W_enc(device):
    # circuit-tracer stores W_enc as [d_sae, d_in]; its transpose is a strided [d_in, d_sae] view.
    x, W, b, t = encoder_inputs(6, 20, 70, 10, device=device, seed=12)
    Wt = W.t().contiguous().t()
    assert not Wt.is_contiguous() and torch.equal(Wt, W)
    out = ops.jumprelu_encode(x, Wt, b, t)
    assert_sparse_close(out, ops.jumprelu_encode(x, W, b, t), F64)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t), F64)
    assert_sparse_close(ops.topk_encode(x, Wt, b, 5)[:3], ops.topk_encode(x, W, b, 5)[:3], F64)
    g = torch.randn_like(out.pre_acts)
    args = (t, out.row_offsets, out.feat_idx, out.pre_acts, 0.0)
    for a, r in zip(bwd_jumprelu(g, x, Wt, *args), bwd_jumprelu(g, x, W, *args)):
        assert_close_in(F64, a, r)


def test_jumprelu_gradcheck(device):
    x, W, b, t = encoder_inputs(6, 5, 12, 4, device=device)
    for v in (x, W, b, t):
        v.requires_grad_(True)
    torch.autograd.gradcheck(lambda *a: ops.jumprelu_encode(*a).acts, (x, W, b, t))


def test_jumprelu_threshold_straight_through(device):
    x, W, b, t = encoder_inputs(30, 12, 40, 8, device=device)
    bw = 0.3
    out = ops.jumprelu_encode(x, W, b, t, bandwidth=bw)
    g = torch.randn_like(out.acts)
    ours = torch.ops.cltrace.jumprelu_encode_backward(g, x, W, t, out.row_offsets, out.feat_idx,
                                                     out.pre_acts, bw)
    theirs = ref.jumprelu_encode_backward(g, x, W, t, out.row_offsets, out.feat_idx,
                                          out.pre_acts, bw)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert ours[3].abs().sum() > 0, "band entries must move the threshold"
    # The same through autograd on the wrapper.
    t2 = t.clone().requires_grad_(True)
    (ops.jumprelu_encode(x, W, b, t2, bandwidth=bw).acts * g).sum().backward()
    torch.testing.assert_close(t2.grad, theirs[3])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d_in,d_sae,k", [(1, 8, 16, 1), (23, 12, 100, 7), (4, 6, 9, 9)])
def test_topk_matches_reference(device, dtype, n, d_in, d_sae, k):
    x, W, b, _ = encoder_inputs(n, d_in, d_sae, k, dtype=dtype, device=device)
    out = ops.topk_encode(x, W, b, k)
    assert_sparse_close(out[:3], ref.topk_encode(x, W, b, k), dtype)
    assert out.row_offsets.tolist() == [i * k for i in range(n + 1)]


@pytest.mark.parametrize("dtype", LOW)
def test_topk_low_precision_is_a_top_k_set(device, dtype):
    n, d_sae, k = 11, 500, 16
    x, W, b, _ = encoder_inputs(n, 40, d_sae, k, dtype=dtype, device=device, seed=2)
    ro, fi, acts = (v.cpu() for v in ops.topk_encode(x, W, b, k)[:3])
    assert_valid_csr(ro, fi, n, d_sae)
    assert torch.equal(ro, torch.arange(n + 1) * k)
    z = x.cpu().double() @ W.cpu().double() + b.cpu().double()
    picked = z.gather(1, fi.view(n, k))
    # the selection is a top-k set up to near-ties; acts = relu(z) of the selected features
    assert_close_in(dtype, picked.sort(1, descending=True).values, z.topk(k, 1).values)
    assert_close_in(dtype, acts.view(n, k), picked.relu())


def test_topk_gradcheck(device):
    x, W, b, _ = encoder_inputs(5, 6, 15, 4, device=device)
    for v in (x, W, b):
        v.requires_grad_(True)
    torch.autograd.gradcheck(lambda *a: ops.topk_encode(*a, 4).acts, (x, W, b))
    out = ops.topk_encode(x, W, b, 4)
    g = torch.randn_like(out.acts)
    ours = torch.ops.cltrace.topk_encode_backward(g, x, W, out.row_offsets, out.feat_idx, out.acts)
    theirs = ref.topk_encode_backward(g, x, W, out.row_offsets, out.feat_idx, out.acts)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r)


def _backward_case(dtype, bandwidth=0.4, seed=4):
    """A JumpReLU CSR with band entries (float64, CPU) and a random grad_acts, cast to dtype."""
    x, W, b, t = encoder_inputs(13, 24, 150, 20, seed=seed)
    ro, fi, _acts, pre = ops.jumprelu_encode(x, W, b, t, bandwidth=bandwidth)
    g = torch.randn(fi.numel(), generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return [v.to(dtype) for v in (g, x, W, t)] + [ro, fi, pre.to(dtype)]


@pytest.mark.parametrize("bandwidth", [0.0, 0.4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_jumprelu_backward_matches_reference(device, dtype, bandwidth):
    args = _backward_case(dtype)
    got = bwd_jumprelu(*(a.to(device) for a in args), bandwidth)
    assert all(v.dtype == dtype and v.device.type == torch.device(device).type for v in got)
    # Against the float64 truth; in low precision the band test |z - threshold| < bandwidth/2
    # may round differently at the band's edge, so grad_threshold is compared in float64 only.
    want = ref.jumprelu_encode_backward(*(a.double() if a.is_floating_point() else a
                                          for a in args), bandwidth)
    n_cmp = 4 if dtype == F64 or bandwidth == 0 else 3
    for a, r in list(zip(got, want))[:n_cmp]:
        assert_close_in(dtype, a, r)


@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_backward_matches_reference(device, dtype):
    x, W, b, _ = encoder_inputs(10, 20, 90, 9, seed=8)
    ro, fi, acts = ops.topk_encode(x, W, b, 9)[:3]
    g = torch.randn(fi.numel(), generator=torch.Generator().manual_seed(1), dtype=F64)
    args = [g.to(dtype), x.to(dtype), W.to(dtype), ro, fi, acts.to(dtype)]
    got = bwd_topk(*(a.to(device) for a in args))
    want = ref.topk_encode_backward(*(a.double() if a.is_floating_point() else a for a in args))
    for a, r in zip(got, want):
        assert a.dtype == dtype
        assert_close_in(dtype, a, r)


def test_jumprelu_backward_empty_rows(device):
    # Rows without entries and features without entries get zero gradients.
    x, W, _b, t = encoder_inputs(4, 6, 10, 3, device=device)
    ro = torch.tensor([0, 0, 2, 2, 3], device=device)
    fi = torch.tensor([1, 7, 7], device=device)
    g = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=device)
    pre = t[fi] + 1.0
    got = bwd_jumprelu(g, x, W, t, ro, fi, pre, 0.0)
    want = ref.jumprelu_encode_backward(g, x, W, t, ro, fi, pre, 0.0)
    for a, r in zip(got, want):
        assert_close_in(F64, a, r)
    assert (got[0][[0, 2]] == 0).all(), "rows without entries get no gradient"
    untouched = [f for f in range(10) if f not in (1, 7)]
    assert (got[1][:, untouched] == 0).all(), "features without entries get no gradient"


def test_encoders_opcheck(device):
    x, W, b, t = encoder_inputs(8, 6, 20, 5, device=device)
    # Without inputs requiring grad: every check, and the backward ops too.
    torch.library.opcheck(torch.ops.cltrace.topk_encode.default, (x, W, b, 3))
    torch.library.opcheck(torch.ops.cltrace.jumprelu_encode.default, (x, W, b, t, 0.2))
    ro, fi, acts, pre = ops.jumprelu_encode(x, W, b, t, bandwidth=0.2)
    torch.library.opcheck(bwd_jumprelu.default, (acts, x, W, t, ro, fi, pre, 0.2))
    tro, tfi, tacts = ops.topk_encode(x, W, b, 3)[:3]
    torch.library.opcheck(bwd_topk.default, (tacts, x, W, tro, tfi, tacts))
    x.requires_grad_(True)
    W.requires_grad_(True)
    # With them, opcheck's AOT-dispatch test sums all outputs in place starting from the first
    # one, which for the encoders is the int64 row_offsets, so it cannot run on them; the
    # schema, fake-tensor and autograd-registration checks can (sparse_decode, whose output
    # is floating, gets the full opcheck in test_decode.py).
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.cltrace.topk_encode.default, (x, W, b, 3), test_utils=utils)
    torch.library.opcheck(torch.ops.cltrace.jumprelu_encode.default, (x, W, b, t, 0.0),
                          test_utils=utils)


def test_encoder_bad_input_messages(device):
    x, W, b, t = encoder_inputs(4, 6, 10, 3, device=device)
    with pytest.raises(RuntimeError, match="x has d_in = 6 but W_enc is"):
        ops.jumprelu_encode(x, W.T.contiguous(), b, t)
    with pytest.raises(RuntimeError, match="threshold has 9 entries but W_enc has d_sae = 10"):
        ops.jumprelu_encode(x, W, b, t[:9])
    with pytest.raises(RuntimeError, match="W_enc has dtype Float but x has Double"):
        ops.jumprelu_encode(x, W.float(), b, t)
    with pytest.raises(RuntimeError, match="x must be a floating tensor"):
        ops.jumprelu_encode(x.long(), W, b, t)
    with pytest.raises(RuntimeError, match="x \\[N, d_in\\] must be 2-D"):
        ops.jumprelu_encode(x[0], W, b, t)
    with pytest.raises(RuntimeError, match="bandwidth must be >= 0"):
        ops.jumprelu_encode(x, W, b, t, bandwidth=-1.0)
    with pytest.raises(RuntimeError, match="k must be in \\[1, d_sae = 10\\]"):
        ops.topk_encode(x, W, b, 11)


@ops.checking_values()  # index values: always on the CPU, on CUDA with the switch
def test_encoder_backward_rejects_bad_indices(device):
    x, W, b, _ = encoder_inputs(4, 6, 10, 3, device=device)
    out = ops.topk_encode(x, W, b, 3)
    g = torch.ones_like(out.acts)
    bwd = torch.ops.cltrace.topk_encode_backward
    with pytest.raises(RuntimeError, match="out of range for W_enc with d_sae = 10"):
        bwd(g, x, W, out.row_offsets, torch.full_like(out.feat_idx, 10), out.acts)
    bad = out.row_offsets.clone()
    bad[-1] += 1
    with pytest.raises(RuntimeError, match="row_offsets must run from 0 to nnz"):
        bwd(g, x, W, bad, out.feat_idx, out.acts)


@ops.checking_values()
def test_jumprelu_backward_checks_match_on_every_device(device):
    # One contract (csrc/checks/encode.h) for CPU and CUDA: the same messages on each device.
    x, W, b, t = encoder_inputs(4, 6, 10, 3, device=device)
    out = ops.jumprelu_encode(x, W, b, t)
    g = torch.ones_like(out.acts)
    bwd = torch.ops.cltrace.jumprelu_encode_backward
    args = (out.row_offsets, out.feat_idx, out.pre_acts)
    with pytest.raises(RuntimeError, match="threshold must be \\[d_sae = 10\\]"):
        bwd(g, x, W, t[:9], *args, 0.0)
    with pytest.raises(RuntimeError, match="pre_acts and grad_acts differ in length"):
        bwd(g, x, W, t, out.row_offsets, out.feat_idx, out.pre_acts[:-1], 0.0)
    with pytest.raises(RuntimeError, match="feat_idx\\[0\\] = 10 is out of range for W_enc with d_sae = 10"):
        bwd(g, x, W, t, out.row_offsets, torch.full_like(out.feat_idx, 10), out.pre_acts, 0.0)
    nnz = out.feat_idx.numel()
    assert nnz > 0
    bad = torch.tensor([0, nnz, 0, 0, nnz], device=device)  # runs 0 .. nnz, decreasing at row 1
    with pytest.raises(RuntimeError, match="row_offsets decrease at row 1"):
        bwd(g, x, W, t, bad, out.feat_idx, out.pre_acts, 0.0)
    with pytest.raises(RuntimeError, match="bandwidth must be >= 0"):
        bwd(g, x, W, t, *args, -1.0)


def _assert_encoder_backward_value_errors(device):
    """Out-of-range feat_idx and bad row_offsets raise in both encoder backwards."""
    x, W, b, t = encoder_inputs(4, 6, 10, 3, device=device)
    out = ops.jumprelu_encode(x, W, b, t)
    nnz = out.feat_idx.numel()
    assert nnz > 1
    g = torch.ones_like(out.acts)
    calls = (("jumprelu_encode_backward",
              lambda ro, fi: bwd_jumprelu(g, x, W, t, ro, fi, out.pre_acts, 0.0)),
             ("topk_encode_backward", lambda ro, fi: bwd_topk(g, x, W, ro, fi, out.acts)))
    far = out.feat_idx.clone()
    far[-1] = 10
    ends = out.row_offsets.clone()
    ends[0] = 1
    down = torch.tensor([0, nnz, 0, 0, nnz], device=device)
    for name, call in calls:
        with pytest.raises(RuntimeError, match=f"{name}: feat_idx\\[{nnz - 1}\\] = 10 is out of "
                                               "range for W_enc with d_sae = 10"):
            call(out.row_offsets, far)
        with pytest.raises(RuntimeError, match=f"{name}: row_offsets must run from 0 to nnz = {nnz}, "
                                               f"got 1 .. {nnz}"):
            call(ends, out.feat_idx)
        with pytest.raises(RuntimeError, match=f"{name}: row_offsets decrease at row 1"):
            call(down, out.feat_idx)
        call(out.row_offsets, out.feat_idx)  # and the valid call runs


def test_encoder_backward_cpu_checks_index_values_with_the_switch_off():
    with ops.checking_values(False):
        _assert_encoder_backward_value_errors("cpu")


# --- CUDA only: against the CPU op, mixed devices ----------------------------------------------

@pytest.mark.cuda
def test_encoder_backward_cuda_value_checks_follow_the_switch():
    with ops.checking_values(True):
        _assert_encoder_backward_value_errors("cuda")
    args = tuple(a.cuda() for a in _backward_case(torch.float32))
    with ops.checking_values(True):
        want = bwd_jumprelu(*args, 0.0)
    with ops.checking_values(False):  # valid inputs: the same result without the check
        got = bwd_jumprelu(*args, 0.0)
    for a, r in zip(got, want):
        assert torch.equal(a, r)


@pytest.mark.cuda
@pytest.mark.parametrize("bandwidth", [0.0, 0.3])
@pytest.mark.parametrize("n,d_in,d_sae", [(7, 32, 96), (1, 37, 53), (33, 64, 1000),
                                          (3, 16, 20000), (1100, 8, 40)])  # and CUDA's tiles
def test_jumprelu_cuda_matches_cpu(n, d_in, d_sae, bandwidth):
    args = encoder_inputs(n, d_in, d_sae, 16, seed=n + d_sae)
    cuda = ops.jumprelu_encode(*(a.cuda() for a in args), bandwidth=bandwidth)
    assert cuda.feat_idx.is_cuda
    assert_sparse_close(cuda, ops.jumprelu_encode(*args, bandwidth=bandwidth), F64)


@pytest.mark.cuda
@pytest.mark.parametrize("n,d_in,d_sae,k", [(9, 32, 100, 7), (1, 37, 53, 1), (4, 16, 24, 24)])
def test_topk_cuda_matches_cpu(n, d_in, d_sae, k):
    x, W, b, _ = encoder_inputs(n, d_in, d_sae, k, seed=k)
    cuda = ops.topk_encode(x.cuda(), W.cuda(), b.cuda(), k)
    assert cuda.feat_idx.is_cuda
    assert_sparse_close(cuda[:3], ops.topk_encode(x, W, b, k)[:3], F64)


@pytest.mark.cuda
@pytest.mark.parametrize("bandwidth", [0.0, 0.4])
@pytest.mark.parametrize("dtype", FLOATS)
def test_jumprelu_backward_cuda_matches_cpu(dtype, bandwidth):
    # The same dtype on both devices: the same band decisions, so grad_threshold too.
    args = _backward_case(dtype)
    cuda = bwd_jumprelu(*(a.cuda() for a in args), bandwidth)
    for a, r in zip(cuda, bwd_jumprelu(*args, bandwidth)):
        assert a.is_cuda
        assert_close_in(dtype, a, r)


@pytest.mark.cuda
def test_topk_backward_cuda_matches_cpu():
    x, W, b, _ = encoder_inputs(10, 20, 90, 9, seed=8)
    ro, fi, acts = ops.topk_encode(x, W, b, 9)[:3]
    args = (torch.randn_like(acts), x, W, ro, fi, acts)
    for a, r in zip(bwd_topk(*(a.cuda() for a in args)), bwd_topk(*args)):
        assert a.is_cuda
        assert_close_in(F64, a, r)


@pytest.mark.cuda
def test_encoders_reject_mixed_devices():
    x, W, b, t = encoder_inputs(3, 8, 16, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        ops.jumprelu_encode(x.cuda(), W, b.cuda(), t.cuda())
    with pytest.raises(RuntimeError, match="is on"):
        ops.topk_encode(x.cuda(), W.cuda(), b, 2)
