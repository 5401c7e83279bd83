"""Typed wrappers of the compiled ops, with their fake (shape) and autograd registrations.

Each op is defined once in ``csrc/ops.cpp``, implemented in ``csrc/cpu`` and ``csrc/cuda``,
and has a pure-torch twin of the same signature in :mod:`cltrace.reference`.

Sparse activations are CSR over rows (one row per token position): ``row_offsets [N+1]``,
``feat_idx [nnz]`` (ascending within a row), ``acts [nnz]``.

Argument checks (``csrc/checks/<op>.h``, one contract per op for both devices; errors are
``RuntimeError`` naming the op, the argument and the bad value):

* dtypes, shapes, devices and scalar arguments (``k``, ``bandwidth``): on every call, on
  every device (tensor metadata only, no device work);
* index values (``feat_idx`` and ``pos`` in range, ``row_offsets`` running from 0 to nnz
  without decreasing): always on the CPU; on CUDA only while value checks are switched on,
  because there they cost a host synchronisation per call (attribution calls the ops once per
  batch x layer x writing layer). Switch them on with the environment variable
  ``CLTRACE_CHECK_VALUES=1`` (read when the library loads), :func:`set_check_values` or
  :func:`checking_values`. With them off, an out-of-range index on CUDA is undefined
  (typically an illegal memory access reported by a later CUDA call): rerun with the switch
  on to get the CPU's message.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from . import _C  # loads the library, registering torch.ops.cltrace.*

_ops = torch.ops.cltrace


def set_check_values(on: bool) -> bool:
    """Switch the index-value checks on CUDA on or off (process-wide); returns the previous
    state. The CPU always checks index values."""
    return _C.set_check_values(bool(on))


def check_values_enabled() -> bool:
    """Whether the ops check index values on CUDA (``CLTRACE_CHECK_VALUES`` or
    :func:`set_check_values`)."""
    return _C.check_values()


@contextlib.contextmanager
def checking_values(on: bool = True) -> Iterator[None]:
    """Run the block with the index-value checks on CUDA switched ``on`` (or off), then
    restore the previous state."""
    before = set_check_values(on)
    try:
        yield
    finally:
        set_check_values(before)


class SparseActs(NamedTuple):
    """Sparse feature activations of N rows, as CSR."""

    row_offsets: Tensor  # [N+1] int64
    feat_idx: Tensor  # [nnz] int64
    acts: Tensor  # [nnz]
    pre_acts: Optional[Tensor] = None  # [nnz] pre-activations z (JumpReLU only)

    @property
    def n_rows(self) -> int:
        return self.row_offsets.numel() - 1

    def rows(self) -> Tensor:
        """Row index of every entry: [nnz]."""
        counts = self.row_offsets.diff()
        return torch.repeat_interleave(torch.arange(self.n_rows, device=counts.device), counts)

    def to_dense(self, d_sae: int) -> Tensor:
        """Dense [N, d_sae] activations (for tests and small cases only)."""
        out = self.acts.new_zeros(self.n_rows, d_sae)
        return out.index_put_((self.rows(), self.feat_idx), self.acts, accumulate=True)


# --- JumpReLU encode ---------------------------------------------------------------------

def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float = 0.0) -> SparseActs:
    """Active features of each row of ``x [N, d_in]`` under a JumpReLU encoder.

    ``acts = z * (z > threshold)`` with ``z = x @ W_enc + b_enc``; with ``bandwidth > 0`` the
    entries within ``bandwidth/2`` below the threshold are kept too (with ``acts = 0``) so that
    backward can apply the rectangle straight-through estimator for the threshold.
    Differentiable in ``acts`` w.r.t. x, W_enc, b_enc and threshold.
    """
    return SparseActs(*_ops.jumprelu_encode(x, W_enc, b_enc, threshold, bandwidth))


@torch.library.register_fake("cltrace::jumprelu_encode")
def _jumprelu_encode_fake(x, W_enc, b_enc, threshold, bandwidth=0.0):
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape[0] + 1, dtype=torch.int64), x.new_empty(nnz, dtype=torch.int64),
            x.new_empty(nnz), x.new_empty(nnz))


@torch.library.register_fake("cltrace::jumprelu_encode_backward")
def _jumprelu_encode_backward_fake(grad_acts, x, W_enc, threshold, row_offsets, feat_idx,
                                   pre_acts, bandwidth):
    return (torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[1]),
            torch.empty_like(threshold))


def _jumprelu_encode_setup(ctx, inputs, output):
    x, W_enc, _b_enc, threshold, *rest = inputs
    row_offsets, feat_idx, _acts, pre_acts = output
    ctx.save_for_backward(x, W_enc, threshold, row_offsets, feat_idx, pre_acts)
    ctx.bandwidth = rest[0] if rest else 0.0
    ctx.mark_non_differentiable(row_offsets, feat_idx, pre_acts)


def _jumprelu_encode_backward(ctx, _g_off, _g_idx, grad_acts, _g_pre):
    x, W_enc, threshold, row_offsets, feat_idx, pre_acts = ctx.saved_tensors
    if grad_acts is None:
        grad_acts = torch.zeros_like(pre_acts)
    grads = _ops.jumprelu_encode_backward(grad_acts, x, W_enc, threshold, row_offsets, feat_idx,
                                          pre_acts, ctx.bandwidth)
    return (*grads, None)


torch.library.register_autograd("cltrace::jumprelu_encode", _jumprelu_encode_backward,
                                setup_context=_jumprelu_encode_setup)


# --- TopK encode -------------------------------------------------------------------------

def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> SparseActs:
    """The ``k`` largest ``z = x @ W_enc + b_enc`` of each row, ReLU'd (k entries a row)."""
    return SparseActs(*_ops.topk_encode(x, W_enc, b_enc, k))


@torch.library.register_fake("cltrace::topk_encode")
def _topk_encode_fake(x, W_enc, b_enc, k):
    n = x.shape[0]
    return (x.new_empty(n + 1, dtype=torch.int64), x.new_empty(n * k, dtype=torch.int64),
            x.new_empty(n * k))


@torch.library.register_fake("cltrace::topk_encode_backward")
def _topk_encode_backward_fake(grad_acts, x, W_enc, row_offsets, feat_idx, acts):
    return torch.empty_like(x), torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[1])


def _topk_encode_setup(ctx, inputs, output):
    x, W_enc, _b_enc, _k = inputs
    row_offsets, feat_idx, acts = output
    ctx.save_for_backward(x, W_enc, row_offsets, feat_idx, acts)
    ctx.mark_non_differentiable(row_offsets, feat_idx)


def _topk_encode_backward(ctx, _g_off, _g_idx, grad_acts):
    x, W_enc, row_offsets, feat_idx, acts = ctx.saved_tensors
    grads = _ops.topk_encode_backward(grad_acts, x, W_enc, row_offsets, feat_idx, acts)
    return (*grads, None)


torch.library.register_autograd("cltrace::topk_encode", _topk_encode_backward,
                                setup_context=_topk_encode_setup)


# --- Sparse decode -----------------------------------------------------------------------

def sparse_decode(row_offsets: Tensor, feat_idx: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """``out[i, o] = sum_{j in row i} acts[j] * W_dec[feat_idx[j], o]`` -> ``[N, n_out, d_model]``.

    ``W_dec [d_sae, n_out, d_model]``; a per-layer transcoder has ``n_out = 1`` (pass
    ``W_dec[:, None]``); a cross-layer transcoder's source layer writes to ``n_out`` layers.
    Differentiable w.r.t. ``acts`` and ``W_dec``.
    """
    return _ops.sparse_decode(row_offsets, feat_idx, acts, W_dec)


@torch.library.register_fake("cltrace::sparse_decode")
def _sparse_decode_fake(row_offsets, feat_idx, acts, W_dec):
    return W_dec.new_empty(row_offsets.shape[0] - 1, W_dec.shape[1], W_dec.shape[2])


@torch.library.register_fake("cltrace::sparse_decode_backward")
def _sparse_decode_backward_fake(grad_out, row_offsets, feat_idx, acts, W_dec):
    return torch.empty_like(acts), torch.empty_like(W_dec)


def _sparse_decode_setup(ctx, inputs, output):
    row_offsets, feat_idx, acts, W_dec = inputs
    ctx.save_for_backward(row_offsets, feat_idx, acts, W_dec)


def _sparse_decode_backward(ctx, grad_out):
    row_offsets, feat_idx, acts, W_dec = ctx.saved_tensors
    grad_acts, grad_W_dec = _ops.sparse_decode_backward(grad_out, row_offsets, feat_idx, acts, W_dec)
    return None, None, grad_acts, grad_W_dec


torch.library.register_autograd("cltrace::sparse_decode", _sparse_decode_backward,
                                setup_context=_sparse_decode_setup)


# --- Attribution ---------------------------------------------------------------------------

def attribution_contract(grad: Tensor, pos: Tensor, W_dec: Tensor, feat_idx: Tensor,
                         acts: Tensor) -> Tensor:
    """Edge weights ``edges[b, s] = acts[s] * <W_dec[feat_idx[s]], grad[b, pos[s]]>`` -> ``[B, S]``.

    ``grad [B, n_pos, d_model]`` holds the gradients of B targets w.r.t. one layer's MLP
    output; the S sources are features decoding into that layer. ``W_dec [n_rows, d_model]``
    may have a row stride (e.g. a cross-layer slice ``W_dec[:, o, :]``). Not differentiable.
    """
    return _ops.attribution_contract(grad, pos, W_dec, feat_idx, acts)


@torch.library.register_fake("cltrace::attribution_contract")
def _attribution_contract_fake(grad, pos, W_dec, feat_idx, acts):
    return grad.new_empty(grad.shape[0], feat_idx.shape[0])


def gather_columns(W_enc: Tensor, feat_idx: Tensor) -> Tensor:
    """``out[t] = W_enc[:, feat_idx[t]]`` -> ``[T, d_in]``: encoder directions of target features."""
    return _ops.gather_columns(W_enc, feat_idx)


@torch.library.register_fake("cltrace::gather_columns")
def _gather_columns_fake(W_enc, feat_idx):
    return W_enc.new_empty(feat_idx.shape[0], W_enc.shape[0])


# --- Pruning passes over edge rows (CPU) ----------------------------------------------------
# Each reads edges [R, N] once and works on the block row_mask [R] x col_mask [N] (bool);
# other entries count as 0. Scores: s[i, j] = (|edges[i, j]| / scale[i]) * weight[i], in the
# edges' dtype (float32 or float64), as torch would round `edges.abs() / scale * weight`.

def edge_abs_row_sums(edges: Tensor, row_mask: Tensor, col_mask: Tensor) -> Tensor:
    """``[R]`` float64: ``sum_j |edges[i, j]|`` over the block."""
    return _ops.edge_abs_row_sums(edges, row_mask, col_mask)


def edge_score_col_sums(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                        col_mask: Tensor) -> Tensor:
    """``[N]`` float64: ``sum_i s[i, j]`` over the block."""
    return _ops.edge_score_col_sums(edges, scale, weight, row_mask, col_mask)


def edge_score_histogram(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                         col_mask: Tensor) -> Tensor:
    """``[65536]`` float64: the sum of the block's scores per bucket of their bit patterns
    (pattern >> 15 for float32, >> 47 for float64; buckets ascend with the score)."""
    return _ops.edge_score_histogram(edges, scale, weight, row_mask, col_mask)


class EdgeMask(NamedTuple):
    """The block's entries with ``s >= min_score``, and those of them below ``band_end``."""

    mask: Tensor  # [R, N] bool
    n_in: Tensor  # [R] int64: entries per row
    n_out: Tensor  # [N] int64: entries per column
    band_rows: Tensor  # [E] int64, row-major order
    band_cols: Tensor  # [E] int64
    band_scores: Tensor  # [E]


def edge_score_mask(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                    col_mask: Tensor, min_score: float, band_end: float) -> EdgeMask:
    """Mask (with row and column counts) of the block's entries with ``s >= min_score``, and
    the list of those with ``s < band_end`` too."""
    return EdgeMask(*_ops.edge_score_mask(edges, scale, weight, row_mask, col_mask, min_score, band_end))


@torch.library.register_fake("cltrace::edge_abs_row_sums")
def _edge_abs_row_sums_fake(edges, row_mask, col_mask):
    return edges.new_empty(edges.shape[0], dtype=torch.float64)


@torch.library.register_fake("cltrace::edge_score_col_sums")
def _edge_score_col_sums_fake(edges, scale, weight, row_mask, col_mask):
    return edges.new_empty(edges.shape[1], dtype=torch.float64)


@torch.library.register_fake("cltrace::edge_score_histogram")
def _edge_score_histogram_fake(edges, scale, weight, row_mask, col_mask):
    return edges.new_empty(1 << 16, dtype=torch.float64)


@torch.library.register_fake("cltrace::edge_score_mask")
def _edge_score_mask_fake(edges, scale, weight, row_mask, col_mask, min_score, band_end):
    R, N = edges.shape
    nnz = torch.library.get_ctx().new_dynamic_size()
    return (edges.new_empty(R, N, dtype=torch.bool), edges.new_empty(R, dtype=torch.int64),
            edges.new_empty(N, dtype=torch.int64), edges.new_empty(nnz, dtype=torch.int64),
            edges.new_empty(nnz, dtype=torch.int64), edges.new_empty(nnz))
