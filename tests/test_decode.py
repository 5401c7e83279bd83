"""Sparse decode (per-layer and cross-layer) and its backward against the reference; on CUDA
also against the CPU op (tests marked cuda)."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
from support.numerics import FLOATS, csr_inputs

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}
bwd = torch.ops.cltrace.sparse_decode_backward


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,d_sae,n_out,d_model,per_row", [
    (1, 10, 1, 16, 4), (30, 200, 1, 24, 12), (17, 64, 6, 13, 9), (8, 50, 3, 640, 20)])
def test_decode_matches_reference(device, dtype, n, d_sae, n_out, d_model, per_row):
    off, idx, acts = csr_inputs(n, d_sae, per_row, dtype=dtype, device=device)
    W = torch.randn(d_sae, n_out, d_model, dtype=torch.float64).to(dtype=dtype, device=device)
    out = ops.sparse_decode(off, idx, acts, W)
    expected = ref.sparse_decode(off.cpu(), idx.cpu(), acts.double().cpu(), W.double().cpu())
    torch.testing.assert_close(out.double().cpu(), expected, **TOL[dtype])
    assert out.shape == (n, n_out, d_model) and out.dtype == dtype


def test_decode_duplicates_empty_rows_and_nothing_active(device):
    off, idx, acts = csr_inputs(12, 5, 6, device=device, duplicates=True)
    assert (off.diff() == 0).any() and (idx[:-1] == idx[1:]).any()
    W = torch.randn(5, 2, 7, dtype=torch.float64, device=device)
    torch.testing.assert_close(ops.sparse_decode(off, idx, acts, W),
                               ref.sparse_decode(off, idx, acts, W))
    none = torch.zeros(4, dtype=torch.int64, device=device)
    nothing = ops.sparse_decode(none, idx[:0], acts[:0], W)
    assert nothing.shape == (3, 2, 7) and (nothing == 0).all()
    grad_acts, grad_W = bwd(torch.randn(3, 2, 7, dtype=torch.float64, device=device), none,
                            idx[:0], acts[:0], W)
    assert grad_acts.numel() == 0 and torch.equal(grad_W, torch.zeros_like(W))


@pytest.mark.parametrize("dtype", FLOATS)
def test_decode_backward_matches_reference(device, dtype):
    off, idx, acts = csr_inputs(20, 40, 8, dtype=dtype, device=device, duplicates=True)
    W = torch.randn(40, 3, 11, dtype=torch.float64).to(dtype=dtype, device=device)
    g = torch.randn(20, 3, 11, dtype=torch.float64).to(dtype=dtype, device=device)
    ours = bwd(g, off, idx, acts, W)
    theirs = ref.sparse_decode_backward(g.double(), off, idx, acts.double(), W.double())
    for a, r in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), r, **TOL[dtype])
    untouched = torch.ones(40, dtype=torch.bool, device=device)
    untouched[idx] = False
    assert (ours[1][untouched] == 0).all(), "only decoder rows of active features get gradient"


def test_decode_backward_fp32_many_columns(device):
    # Wide rows exercise the column-sliced accumulation of grad_W_dec.
    off, idx, acts = csr_inputs(64, 300, 30, dtype=torch.float32, device=device, duplicates=True)
    W = torch.randn(300, 2, 640, device=device)
    g = torch.randn(64, 2, 640, device=device)
    ours = torch.ops.cltrace.sparse_decode_backward(g, off, idx, acts, W)
    theirs = ref.sparse_decode_backward(g.double(), off, idx, acts.double(), W.double())
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4)


def test_decode_gradcheck_and_opcheck(device):
    off, idx, acts = csr_inputs(6, 9, 4, device=device, duplicates=True)
    W = torch.randn(9, 2, 5, dtype=torch.float64, device=device)
    torch.library.opcheck(bwd.default, (torch.randn(6, 2, 5, dtype=torch.float64, device=device),
                                        off, idx, acts, W))
    W.requires_grad_(True)
    acts.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, w: ops.sparse_decode(off, idx, a, w), (acts, W))
    torch.library.opcheck(torch.ops.cltrace.sparse_decode.default, (off, idx, acts, W))


def test_decode_bad_input_messages(device):
    off, idx, acts = csr_inputs(5, 9, 4, device=device)
    W = torch.randn(9, 1, 4, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="W_dec \\[d_sae, n_out, d_model\\] must be 3-D"):
        ops.sparse_decode(off, idx, acts, W[:, 0])
    with ops.checking_values(), pytest.raises(RuntimeError, match="is out of range for W_dec with d_sae = 9"):
        ops.sparse_decode(off, torch.full_like(idx, 9), acts, W)
    with pytest.raises(RuntimeError, match="feat_idx has .* entries but acts has"):
        ops.sparse_decode(off, idx, acts[:-1], W)
    with pytest.raises(RuntimeError, match="row_offsets must be int64"):
        ops.sparse_decode(off.int(), idx, acts, W)
    with pytest.raises(RuntimeError, match="acts has dtype Float but W_dec has Double"):
        ops.sparse_decode(off, idx, acts.float(), W)
    with ops.checking_values(), pytest.raises(RuntimeError, match="row_offsets must run from 0"):
        ops.sparse_decode(off + 1, idx, acts, W)  # from 1, not 0
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(torch.randn(6, 1, 4, dtype=torch.float64, device=device), off, idx, acts, W)
    # raised, not a device-side assert: the device still runs the op
    torch.testing.assert_close(ops.sparse_decode(off, idx, acts, W),
                               ref.sparse_decode(off, idx, acts, W))


def test_decode_unaligned_and_strided_inputs(device):
    # An offset view (W_dec[1:] of a flat buffer) breaks 16-byte alignment; strided acts.
    off, idx, acts = csr_inputs(5, 21, 5, dtype=torch.float32, device=device, duplicates=True)
    W = torch.randn(21 * 64 + 1, device=device)[1:].view(21, 1, 64)
    assert W.data_ptr() % 16 != 0
    acts2 = torch.stack([acts, acts], 1)[:, 1]
    assert not acts2.is_contiguous()
    up = acts.double(), W.double()
    torch.testing.assert_close(ops.sparse_decode(off, idx, acts2, W).double(),
                               ref.sparse_decode(off, idx, *up), **TOL[torch.float32])
    g = torch.randn(5, 1, 64, device=device)
    for a, r in zip(bwd(g, off, idx, acts2, W), ref.sparse_decode_backward(g.double(), off, idx, *up)):
        torch.testing.assert_close(a.double(), r, **TOL[torch.float32])


def test_decode_reads_clt_slices_in_place(device):
    # A Gemma Scope 2 CLT file holds w_dec [d_sae, n_layers, d_model]; source layer i uses the
    # view [:, i:, :], whose rows are strided. Same results as a contiguous copy, both passes.
    off, idx, acts = csr_inputs(9, 30, 5, device=device, duplicates=True)
    full = torch.randn(30, 6, 8, dtype=torch.float64, device=device)
    W = full[:, 2:, :]
    assert not W.is_contiguous()
    torch.testing.assert_close(ops.sparse_decode(off, idx, acts, W),
                               ref.sparse_decode(off, idx, acts, W.contiguous()))
    g = torch.randn(9, 4, 8, dtype=torch.float64, device=device)
    ours = torch.ops.cltrace.sparse_decode_backward(g, off, idx, acts, W)
    theirs = ref.sparse_decode_backward(g, off, idx, acts, W.contiguous())
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(ops.sparse_decode(off, idx, acts, full.transpose(1, 2)),
                               ref.sparse_decode(off, idx, acts, full.transpose(1, 2).contiguous()))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4),
                                       (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("d_model,first", [(64, 2), (64, 0), (37, 1)])
def test_decode_strided_clt_slice_matches_reference(device, dtype, tol, d_model, first):
    # Source layer `first` of a CLT reads w_dec[:, first:, :] of the file's [d_sae, n_layers,
    # d_model] decoder: rows n_layers * d_model apart, each feature's block contiguous. Forward
    # and backward read it in place (16-byte loads on CUDA when d_model allows: 64; not: 37).
    n_layers, d_sae = 5, 60
    off, idx, acts = csr_inputs(11, d_sae, 7, dtype=dtype, device=device, duplicates=True)
    full = torch.randn(d_sae, n_layers, d_model, dtype=torch.float64).to(dtype=dtype, device=device)
    W = full[:, first:, :]
    assert W.stride() == (n_layers * d_model, d_model, 1)
    out = ops.sparse_decode(off, idx, acts, W)
    expected = ref.sparse_decode(off, idx, acts.double(), W.double().contiguous())
    scale = expected.abs().max().clamp_min(1)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
    assert out.shape == (11, n_layers - first, d_model) and out.dtype == dtype
    g = torch.randn(11, n_layers - first, d_model, dtype=torch.float64).to(dtype=dtype, device=device)
    ours = torch.ops.cltrace.sparse_decode_backward(g, off, idx, acts, W)
    theirs = ref.sparse_decode_backward(g.double(), off, idx, acts.double(), W.double().contiguous())
    for a, r in zip(ours, theirs):
        s = r.abs().max().clamp_min(1)
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * s)


@pytest.mark.cuda
def test_decode_allocates_no_copy_of_a_clt_slice():
    # "In place" measured: a copy of the slice w_dec[:, 2:, :] would allocate its size again
    # (allocation statistics exist for the CUDA caching allocator only).
    device = "cuda"
    d_sae, n_layers, d = 4096, 6, 1152
    full = torch.randn(d_sae, n_layers, d, device=device)  # 113 MB
    W = full[:, 2:, :]
    off, idx, acts = csr_inputs(16, d_sae, 8, dtype=torch.float32, device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ops.sparse_decode(off, idx, acts, W)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < W.numel() * W.element_size() // 4, extra  # out [16, 4, d] and index checks only
    torch.testing.assert_close(out, ref.sparse_decode(off, idx, acts, W), rtol=1e-4, atol=1e-4)


def test_decode_rejects_decreasing_offsets(device):
    W = torch.randn(5, 1, 3, dtype=torch.float64, device=device)
    off = torch.tensor([0, 2, 1, 3], device=device)
    with ops.checking_values(), pytest.raises(RuntimeError, match="row_offsets decrease at row 1"):
        ops.sparse_decode(off, torch.tensor([0, 1, 2], device=device),
                          torch.ones(3, dtype=torch.float64, device=device), W)


# --- CUDA only: against the CPU op, mixed devices ----------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("n,d_sae,n_out,d_model", [(6, 40, 1, 64), (5, 30, 3, 51), (1, 7, 1, 8),
                                                   (9, 300, 2, 1000)])
def test_decode_cuda_matches_cpu(n, d_sae, n_out, d_model):
    off, idx, acts = csr_inputs(n, d_sae, 5, duplicates=True, seed=n)
    W = torch.randn(d_sae, n_out, d_model, dtype=torch.float64)
    g = torch.randn(n, n_out, d_model, dtype=torch.float64)
    cuda = ops.sparse_decode(off.cuda(), idx.cuda(), acts.cuda(), W.cuda())
    assert cuda.is_cuda
    torch.testing.assert_close(cuda.cpu(), ops.sparse_decode(off, idx, acts, W), **TOL[torch.float64])
    for a, r in zip(bwd(g.cuda(), off.cuda(), idx.cuda(), acts.cuda(), W.cuda()),
                    bwd(g, off, idx, acts, W)):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), r, **TOL[torch.float64])


@pytest.mark.cuda
def test_decode_rejects_mixed_devices():
    off, idx, acts = csr_inputs(4, 10, 3, dtype=torch.float32)
    W = torch.randn(10, 1, 8)
    with pytest.raises(RuntimeError, match="is on"):
        ops.sparse_decode(off, idx, acts.cuda(), W.cuda())


# --- index values: always on the CPU, on CUDA with the value-check switch -------------------

def _assert_decode_value_errors(device):
    """Out-of-range feat_idx and bad row_offsets raise, naming the op, entry and value."""
    W = torch.randn(5, 1, 3, dtype=torch.float64, device=device)
    acts = torch.ones(3, dtype=torch.float64, device=device)
    g = torch.randn(2, 1, 3, dtype=torch.float64, device=device)
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    off, idx = t(0, 2, 3), t(0, 4, 1)
    for name, call in (("sparse_decode", lambda o, i: ops.sparse_decode(o, i, acts, W)),
                       ("sparse_decode_backward", lambda o, i: bwd(g, o, i, acts, W))):
        with pytest.raises(RuntimeError, match=f"{name}: feat_idx\\[1\\] = 5 is out of range for "
                                               "W_dec with d_sae = 5"):
            call(off, t(0, 5, 1))
        with pytest.raises(RuntimeError, match=f"{name}: feat_idx\\[2\\] = -1 is out of range"):
            call(off, t(0, 4, -1))
        with pytest.raises(RuntimeError, match=f"{name}: row_offsets must run from 0 to nnz = 3, "
                                               "got 0 .. 2"):
            call(t(0, 2, 2), idx)
        with pytest.raises(RuntimeError, match=f"{name}: row_offsets decrease at row 1"):
            call(t(0, 4, 3), idx)
        call(off, idx)  # and the valid call runs


def test_decode_cpu_checks_index_values_with_the_switch_off():
    with ops.checking_values(False):
        _assert_decode_value_errors("cpu")


@pytest.mark.cuda
def test_decode_cuda_value_checks_follow_the_switch():
    off, idx, acts = csr_inputs(6, 40, 5, duplicates=True, device="cuda")
    W = torch.randn(40, 2, 64, dtype=torch.float64, device="cuda")
    with ops.checking_values(True):
        want = ops.sparse_decode(off, idx, acts, W)
        _assert_decode_value_errors("cuda")
    with ops.checking_values(False):  # no index check, no host sync
        torch.cuda.synchronize()
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = ops.sparse_decode(off, idx, acts, W)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    assert torch.equal(got, want)
