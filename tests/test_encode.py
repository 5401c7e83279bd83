"""Sparse JumpReLU / TopK encoders against the pure-torch reference, gradients, edge cases."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
from conftest import encoder_inputs

# Tolerances on values relative to max |z|: fp64 exact up to summation order, fp32 and bf16
# as the dtype's rounding of a d_in-term dot product.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2}


def assert_sparse_close(ours, theirs, dtype):
    """Same CSR structure and values, up to the dtype's tolerance."""
    assert torch.equal(ours[0].cpu(), theirs[0].cpu()), "row_offsets differ"
    assert torch.equal(ours[1].cpu(), theirs[1].cpu()), "feat_idx differ"
    scale = max(1.0, float(theirs[2].abs().max())) if theirs[2].numel() else 1.0
    for a, b in zip(ours[2:], theirs[2:]):
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=0,
                                   atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d_in,d_sae,l0", [(1, 16, 64, 5), (37, 24, 300, 20), (5, 7, 33, 33)])
def test_jumprelu_matches_reference(device, dtype, n, d_in, d_sae, l0):
    x, W, b, t = encoder_inputs(n, d_in, d_sae, l0, dtype=dtype, device=device)
    out = ops.jumprelu_encode(x, W, b, t)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t), dtype)
    assert (out.acts > 0).all() and torch.equal(out.acts, out.pre_acts)


def test_jumprelu_tiles_rows_and_columns(device):
    # More rows than one row block (256) and more features than one column tile (8192).
    x, W, b, t = encoder_inputs(300, 8, 9000, 30, dtype=torch.float64, device=device)
    out = ops.jumprelu_encode(x, W, b, t)
    assert_sparse_close(out, ref.jumprelu_encode(x, W, b, t), torch.float64)
    assert out.feat_idx.max() >= 8192


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
    every = ops.jumprelu_encode(x, W, b, torch.full_like(t, -1e9))
    assert every.feat_idx.numel() == 6 * 20
    assert torch.equal(every.feat_idx.cpu(), torch.arange(20).repeat(6))
    empty = ops.jumprelu_encode(x[:0], W, b, t)
    assert empty.row_offsets.tolist() == [0] and empty.acts.numel() == 0


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


def test_encoders_opcheck(device):
    x, W, b, t = encoder_inputs(8, 6, 20, 5, device=device)
    x.requires_grad_(True)
    W.requires_grad_(True)
    # opcheck's AOT-dispatch test sums all outputs in place starting from the first one,
    # which for the encoders is the int64 row_offsets, so it cannot run on them; the
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


def test_jumprelu_backward_checks_match_on_every_device(device):
    # One validation (csrc/checks.h) for CPU and CUDA: the same messages on each device.
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
