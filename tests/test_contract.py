"""Attribution contraction and encoder-column gather against the reference; on CUDA also
against the CPU op (tests marked cuda)."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
from support.numerics import FLOATS

# (dtype, tol): rtol, and atol relative to the largest |expected|
DTYPE_TOL = [(torch.float64, 1e-12), (torch.float32, 1e-4), (torch.bfloat16, 5e-2),
             (torch.float16, 5e-3)]


def contract_inputs(B, n_pos, d_model, d_sae, S, *, dtype=torch.float64, device="cpu"):
    grad = torch.randn(B, n_pos, d_model, dtype=torch.float64)
    W = torch.randn(d_sae, d_model, dtype=torch.float64)
    pos = torch.randint(0, n_pos, (S,))
    idx = torch.randint(0, d_sae, (S,))  # duplicates allowed: the same feature at two positions
    acts = torch.rand(S, dtype=torch.float64) + 0.1
    cast = dict(dtype=dtype, device=device)
    return grad.to(**cast), pos.to(device), W.to(**cast), idx.to(device), acts.to(**cast)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
@pytest.mark.parametrize("B,n_pos,d_model,d_sae,S", [
    (1, 1, 8, 4, 1), (16, 9, 37, 50, 120), (3, 40, 640, 300, 64),
    (2, 4, 7000, 12, 9),  # float64 rows over 48 KiB: CUDA reads them from global memory
])
def test_contract_matches_reference(device, dtype, tol, B, n_pos, d_model, d_sae, S):
    args = contract_inputs(B, n_pos, d_model, d_sae, S, dtype=dtype, device=device)
    out = ops.attribution_contract(*args)
    expected = ref.attribution_contract(*[a.double() if a.is_floating_point() else a for a in args])
    scale = expected.abs().max().clamp_min(1)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
    assert out.shape == (B, S) and out.dtype == dtype


def test_contract_strided_clt_slice_and_empty(device):
    grad, pos, _, idx, acts = contract_inputs(4, 6, 10, 30, 25, device=device)
    W3 = torch.randn(30, 5, 10, dtype=torch.float64, device=device)  # CLT decoder [d_sae, n_out, d]
    for o in range(5):
        W = W3[:, o, :]  # rows strided by n_out * d_model
        assert not W.is_contiguous()
        torch.testing.assert_close(ops.attribution_contract(grad, pos, W, idx, acts),
                                   ref.attribution_contract(grad, pos, W, idx, acts))
    # a column-strided W_dec (stride(1) != 1) gives the same edges
    Wt = W3[:, 1, :].t().contiguous().t()
    assert Wt.stride(1) != 1
    torch.testing.assert_close(ops.attribution_contract(grad, pos, Wt, idx, acts),
                               ref.attribution_contract(grad, pos, W3[:, 1, :], idx, acts))
    none = ops.attribution_contract(grad, pos[:0], W3[:, 0], idx[:0], acts[:0])
    assert none.shape == (4, 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4),
                                       (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("d_model", [64, 37])  # 16-byte loads on CUDA / the scalar path
def test_contract_reads_attribution_layout_in_place(device, dtype, tol, d_model):
    # Attribution passes a contiguous seed-major [k, n, d] gradient; the op reads any strides,
    # here the transposed view [k, n, d] of a position-major [n, k, d] one, strides
    # (d, k * d, 1); W_dec is a CLT slice w_dec[:, o, :], rows n_out * d apart. Both must be
    # read where they lie.
    n, k, d_sae, n_out, S = 7, 5, 40, 3, 90
    step_grad = torch.randn(n, k, d_model, dtype=torch.float64).to(dtype=dtype, device=device)
    g = step_grad.transpose(0, 1)
    assert g.shape == (k, n, d_model) and g.stride() == (d_model, k * d_model, 1)
    W3 = torch.randn(d_sae, n_out, d_model, dtype=torch.float64).to(dtype=dtype, device=device)
    pos = torch.randint(0, n, (S,)).sort().values.to(device)  # CSR order: ascending positions
    idx = torch.randint(0, d_sae, (S,), device=device)
    acts = (torch.rand(S, dtype=torch.float64) + 0.1).to(dtype=dtype, device=device)
    for o in range(n_out):
        W = W3[:, o, :]
        assert W.stride() == (n_out * d_model, 1)
        out = ops.attribution_contract(g, pos, W, idx, acts)
        expected = ref.attribution_contract(g.double().contiguous(), pos, W.double().contiguous(),
                                            idx, acts.double())
        scale = expected.abs().max().clamp_min(1)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * scale)
        assert out.shape == (k, S) and out.dtype == dtype
    # a column-strided W_dec (stride(1) != 1) gives the same edges in every dtype too
    Wt = W3[:, 0, :].t().contiguous().t()
    assert Wt.stride(1) != 1
    expected = ref.attribution_contract(g.double().contiguous(), pos, W3[:, 0, :].double(), idx,
                                        acts.double())
    torch.testing.assert_close(ops.attribution_contract(g, pos, Wt, idx, acts).double(), expected,
                               rtol=tol, atol=tol * expected.abs().max().clamp_min(1))
    # the live part of a larger buffer (fewer targets than rows): strides (d, K * d, 1)
    part = torch.randn(n, k + 3, d_model, dtype=torch.float64, device=device)[:, :k].transpose(0, 1)
    W = W3[:, 1, :].double()
    torch.testing.assert_close(ops.attribution_contract(part, pos, W, idx, acts.double()),
                               ref.attribution_contract(part.contiguous(), pos, W.contiguous(),
                                                        idx, acts.double()))


@pytest.mark.cuda
def test_contract_allocates_no_copy_of_the_gradient():
    # "In place" measured: a copy of the transposed gradient would allocate its size again
    # (allocation statistics exist for the CUDA caching allocator only).
    device = "cuda"
    n, k, d, d_sae, S = 128, 64, 1152, 512, 256
    g = torch.randn(n, k, d, device=device).transpose(0, 1)  # [k, n, d], 37.7 MB
    W3 = torch.randn(d_sae, 3, d, device=device)
    pos = torch.randint(0, n, (S,), device=device).sort().values
    idx = torch.randint(0, d_sae, (S,), device=device)
    acts = torch.rand(S, device=device)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ops.attribution_contract(g, pos, W3[:, 1, :], idx, acts)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < g.numel() * g.element_size() // 4, extra  # edges [k, S] and index checks only
    torch.testing.assert_close(out, ref.attribution_contract(g, pos, W3[:, 1, :], idx, acts),
                               rtol=1e-4, atol=1e-3)


def test_contract_bad_input_messages(device):
    grad, pos, W, idx, acts = contract_inputs(2, 5, 8, 10, 6, device=device)
    with pytest.raises(RuntimeError, match="grad has d_model = 8 but W_dec rows have 7"):
        ops.attribution_contract(grad, pos, W[:, :7], idx, acts)
    with ops.checking_values():  # index values: always on the CPU, on CUDA with the switch
        with pytest.raises(RuntimeError, match="pos\\[0\\] = 5 is out of range for grad with n_pos = 5"):
            ops.attribution_contract(grad, torch.full_like(pos, 5), W, idx, acts)
        with pytest.raises(RuntimeError, match="out of range for W_dec with 10 rows"):
            ops.attribution_contract(grad, pos, W, torch.full_like(idx, 10), acts)
    with pytest.raises(RuntimeError, match="one entry per source"):
        ops.attribution_contract(grad, pos[:-1], W, idx, acts)
    # raised, not a device-side assert: the device still runs the op
    torch.testing.assert_close(ops.attribution_contract(grad, pos, W, idx, acts),
                               ref.attribution_contract(grad, pos, W, idx, acts))


def test_contract_opcheck(device):
    args = contract_inputs(3, 4, 6, 9, 7, device=device)
    torch.library.opcheck(torch.ops.cltrace.attribution_contract.default, args)
    # and the layout attribution passes: a transposed gradient, a CLT slice of W_dec
    grad, pos, _, idx, acts = args
    W3 = torch.randn(9, 2, 6, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.cltrace.attribution_contract.default,
                          (grad.transpose(0, 1).contiguous().transpose(0, 1), pos, W3[:, 1, :],
                           idx, acts))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_columns(device, dtype):
    W = torch.randn(37, 100, dtype=torch.float64).to(dtype=dtype, device=device)
    idx = torch.tensor([5, 0, 99, 5, 42], device=device)
    assert torch.equal(ops.gather_columns(W, idx), ref.gather_columns(W, idx))
    assert ops.gather_columns(W, idx[:0]).shape == (0, 37)
    with ops.checking_values(), pytest.raises(RuntimeError, match="feat_idx\\[0\\] = 100 is out of range"):
        ops.gather_columns(W, torch.tensor([100], device=device))
    torch.library.opcheck(torch.ops.cltrace.gather_columns.default, (W, idx))


@pytest.mark.parametrize("d_in,d_sae,T", [(1, 5, 1), (64, 100, 10), (640, 3000, 33)])
def test_gather_columns_shapes(device, d_in, d_sae, T):
    W = torch.randn(d_in, d_sae, dtype=torch.float32, device=device)
    idx = torch.randint(0, d_sae, (T,), device=device)
    idx[-1] = idx[0]  # a duplicate
    out = ops.gather_columns(W, idx)
    assert out.shape == (T, d_in) and torch.equal(out, ref.gather_columns(W, idx))


def test_gather_columns_reads_strided_encoders_in_place(device):
    # circuit-tracer stores W_enc as [d_sae, d_in]: its transpose is a [d_in, d_sae] view.
    W_t = torch.randn(100, 37, dtype=torch.float64, device=device)
    idx = torch.tensor([3, 99, 0, 3], device=device)
    assert torch.equal(ops.gather_columns(W_t.T, idx), W_t[idx])
    W3 = torch.randn(37, 2, 100, dtype=torch.float64, device=device)  # both strides non-unit
    assert torch.equal(ops.gather_columns(W3[:, 1, :], idx), ref.gather_columns(W3[:, 1, :], idx))


# --- CUDA only: against the CPU op, mixed devices ----------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("B,n_pos,d_model,d_sae,S", [
    (3, 5, 64, 50, 20), (1, 1, 51, 3, 1), (12, 7, 640, 200, 40), (2, 4, 7000, 12, 9)])
def test_contract_cuda_matches_cpu(B, n_pos, d_model, d_sae, S):
    args = contract_inputs(B, n_pos, d_model, d_sae, S)
    cuda = ops.attribution_contract(*(a.cuda() for a in args))
    assert cuda.is_cuda
    torch.testing.assert_close(cuda.cpu(), ops.attribution_contract(*args), rtol=1e-12, atol=1e-12)
    # and the layout attribution passes: a transposed gradient, a strided CLT slice
    grad, pos, _, idx, acts = args
    g = grad.transpose(0, 1).contiguous().transpose(0, 1)
    W3 = torch.randn(d_sae, 3, d_model, dtype=torch.float64)
    strided = (g, pos, W3[:, 1, :], idx, acts)
    torch.testing.assert_close(ops.attribution_contract(*(a.cuda() for a in strided)).cpu(),
                               ops.attribution_contract(*strided), rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_columns_cuda_matches_cpu(dtype):
    W = torch.randn(640, 3000, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 3000, (33,))
    idx[-1] = idx[0]
    cuda = ops.gather_columns(W.cuda(), idx.cuda())
    assert cuda.is_cuda and torch.equal(cuda.cpu(), ops.gather_columns(W, idx))


@pytest.mark.cuda
def test_contract_and_gather_reject_mixed_devices():
    grad, pos, W, idx, acts = contract_inputs(2, 3, 8, 6, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="is on"):
        ops.attribution_contract(grad.cuda(), pos, W.cuda(), idx.cuda(), acts.cuda())
    with pytest.raises(RuntimeError, match="is on"):
        ops.gather_columns(W.t().cuda(), idx)


# --- argument checks: metadata on every call; index values always on the CPU, on CUDA with
# the value-check switch (CLTRACE_CHECK_VALUES=1 / ops.set_check_values / ops.checking_values)

def test_value_check_switch_sets_and_restores():
    before = ops.check_values_enabled()
    try:
        assert ops.set_check_values(True) is before
        assert ops.check_values_enabled() is True
        assert ops.set_check_values(False) is True
        assert ops.check_values_enabled() is False
        with pytest.raises(ValueError, match="inside"):
            with ops.checking_values():
                assert ops.check_values_enabled() is True
                raise ValueError("inside")
        assert ops.check_values_enabled() is False  # restored on the way out of an error
        ops.set_check_values(True)
        with ops.checking_values(False):
            assert ops.check_values_enabled() is False
        assert ops.check_values_enabled() is True
    finally:
        ops.set_check_values(before)


@pytest.mark.parametrize("value,expected", [("1", True), ("0", False), (None, False)])
def test_value_check_switch_reads_the_environment_at_load(value, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CLTRACE_CHECK_VALUES"}
    if value is not None:
        env["CLTRACE_CHECK_VALUES"] = value
    out = subprocess.run([sys.executable, "-c", "from cltrace import ops; print(ops.check_values_enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_cpu_checks_index_values_with_the_switch_off():
    grad, pos, W, idx, acts = contract_inputs(2, 5, 8, 10, 6)
    with ops.checking_values(False):
        with pytest.raises(RuntimeError, match="attribution_contract: pos\\[2\\] = -1 is out of range "
                                               "for grad with n_pos = 5"):
            ops.attribution_contract(grad, torch.tensor([0, 4, -1, 0, 0, 0]), W, idx, acts)
        with pytest.raises(RuntimeError, match="attribution_contract: feat_idx\\[5\\] = 10 is out of "
                                               "range for W_dec with 10 rows"):
            ops.attribution_contract(grad, pos, W, torch.tensor([0, 1, 2, 3, 4, 10]), acts)
        with pytest.raises(RuntimeError, match="gather_columns: feat_idx\\[1\\] = 10 is out of range "
                                               "for W_enc with d_sae = 6"):
            ops.gather_columns(W[:6].T, torch.tensor([0, 10]))


def test_contract_metadata_messages_name_the_argument():
    grad, pos, W, idx, acts = contract_inputs(2, 5, 8, 10, 6)
    cases = [
        ((grad[0], pos, W, idx, acts), "grad \\[B, n_pos, d_model\\] must be 3-D, got shape \\[5, 8\\]"),
        ((grad, pos.int(), W, idx, acts), "pos must be int64, got Int"),
        ((grad, pos, W, idx[None], acts), "feat_idx must be 1-D, got shape \\[1, 6\\]"),
        ((grad, pos, W.float(), idx, acts), "W_dec has dtype Float but grad has Double"),
        ((grad.long(), pos, W, idx, acts), "grad must be a floating tensor"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match="attribution_contract: " + message):
            ops.attribution_contract(*args)
    with pytest.raises(RuntimeError, match="gather_columns: W_enc \\[d_in, d_sae\\] must be 2-D"):
        ops.gather_columns(W[0], idx)


def _assert_no_host_sync(fn, *args):
    """fn(*args) on CUDA without a host synchronisation (torch's sync debug mode as an error)."""
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(*args)
    finally:
        torch.cuda.set_sync_debug_mode(before)


@pytest.mark.cuda
def test_contract_and_gather_cuda_value_checks_follow_the_switch():
    grad, pos, W, idx, acts = (a.cuda() for a in contract_inputs(2, 5, 8, 10, 6))
    want = ops.attribution_contract(grad, pos, W, idx, acts)
    with ops.checking_values(False):  # the hot path: no index check, no host sync
        got = _assert_no_host_sync(ops.attribution_contract, grad, pos, W, idx, acts)
        cols = _assert_no_host_sync(ops.gather_columns, W.T, idx)
    assert torch.equal(got, want) and torch.equal(cols, ops.gather_columns(W.T, idx))
    with ops.checking_values(True):
        with pytest.raises(RuntimeError, match="synchronizing"):  # the check is what syncs
            _assert_no_host_sync(ops.attribution_contract, grad, pos, W, idx, acts)
        with pytest.raises(RuntimeError, match="attribution_contract: pos\\[2\\] = -1 is out of range "
                                               "for grad with n_pos = 5"):
            ops.attribution_contract(grad, torch.tensor([0, 4, -1, 0, 0, 0], device="cuda"), W, idx, acts)
        with pytest.raises(RuntimeError, match="attribution_contract: feat_idx\\[5\\] = 10 is out of "
                                               "range for W_dec with 10 rows"):
            ops.attribution_contract(grad, pos, W, torch.tensor([0, 1, 2, 3, 4, 10], device="cuda"), acts)
        with pytest.raises(RuntimeError, match="gather_columns: feat_idx\\[1\\] = 10 is out of range "
                                               "for W_enc with d_sae = 6"):
            ops.gather_columns(W[:6].T, torch.tensor([0, 10], device="cuda"))
        # raised, not a device-side assert: the device still runs the op
        assert torch.equal(ops.attribution_contract(grad, pos, W, idx, acts), want)
