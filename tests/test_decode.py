"""Sparse decode (per-layer and cross-layer) and its backward against the reference."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
from conftest import csr_inputs

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
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
    nothing = ops.sparse_decode(torch.zeros(4, dtype=torch.int64, device=device),
                                idx[:0], acts[:0], W)
    assert nothing.shape == (3, 2, 7) and (nothing == 0).all()


def test_decode_backward_matches_reference(device):
    off, idx, acts = csr_inputs(20, 40, 8, device=device, duplicates=True)
    W = torch.randn(40, 3, 11, dtype=torch.float64, device=device)
    g = torch.randn(20, 3, 11, dtype=torch.float64, device=device)
    ours = torch.ops.cltrace.sparse_decode_backward(g, off, idx, acts, W)
    theirs = ref.sparse_decode_backward(g, off, idx, acts, W)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
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
    W = torch.randn(9, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
    acts.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, w: ops.sparse_decode(off, idx, a, w), (acts, W))
    torch.library.opcheck(torch.ops.cltrace.sparse_decode.default, (off, idx, acts, W))


def test_decode_bad_input_messages(device):
    off, idx, acts = csr_inputs(5, 9, 4, device=device)
    W = torch.randn(9, 1, 4, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="W_dec \\[d_sae, n_out, d_model\\] must be 3-D"):
        ops.sparse_decode(off, idx, acts, W[:, 0])
    with pytest.raises(RuntimeError, match="is out of range for W_dec with d_sae = 9"):
        ops.sparse_decode(off, torch.full_like(idx, 9), acts, W)
    with pytest.raises(RuntimeError, match="feat_idx has .* entries but acts has"):
        ops.sparse_decode(off, idx, acts[:-1], W)
    with pytest.raises(RuntimeError, match="row_offsets must be int64"):
        ops.sparse_decode(off.int(), idx, acts, W)
    with pytest.raises(RuntimeError, match="acts has dtype Float but W_dec has Double"):
        ops.sparse_decode(off, idx, acts.float(), W)


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


def test_decode_allocates_no_copy_of_a_clt_slice(device):
    # "In place" measured: a copy of the slice w_dec[:, 2:, :] would allocate its size again.
    if device != "cuda":
        pytest.skip("allocation statistics exist for the CUDA caching allocator only")
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
    with pytest.raises(RuntimeError, match="row_offsets decrease at row 1"):  # every device
        ops.sparse_decode(off, torch.tensor([0, 1, 2], device=device),
                          torch.ones(3, dtype=torch.float64, device=device), W)
