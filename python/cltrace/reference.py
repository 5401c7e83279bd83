"""Pure-torch twins of every compiled op, with the same signatures: the test oracle.

Each function computes exactly what the op of the same name in ``csrc/ops.cpp`` computes,
with dense intermediates where that is simplest. Sparse results use CSR over rows:
``row_offsets [N+1]``, ``feat_idx [nnz]`` (ascending within a row), values ``[nnz]``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _csr_from_mask(mask: Tensor, values: list[Tensor]) -> tuple[Tensor, ...]:
    """CSR (row_offsets, feat_idx, *values gathered at mask) of a boolean [N, d_sae] mask."""
    rows, feats = mask.nonzero(as_tuple=True)  # row-major order: ascending feature per row
    counts = torch.bincount(rows, minlength=mask.shape[0])
    row_offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.int64, device=mask.device)
    row_offsets[1:] = counts.cumsum(0)
    return (row_offsets, feats, *[v[rows, feats] for v in values])


def _rows_of(row_offsets: Tensor) -> Tensor:
    """Row index of every CSR entry: [nnz]."""
    counts = row_offsets[1:] - row_offsets[:-1]
    return torch.repeat_interleave(torch.arange(len(counts), device=row_offsets.device), counts)


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor,
                    bandwidth: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z = x @ W_enc + b_enc; entries with z > threshold (- bandwidth/2 when bandwidth > 0).

    Returns (row_offsets [N+1], feat_idx [nnz], acts [nnz] = z * (z > threshold), pre_acts [nnz] = z).
    """
    z = x @ W_enc + b_enc  # [N, d_sae]
    keep = z > (threshold - bandwidth / 2) if bandwidth > 0 else z > threshold
    acts = z * (z > threshold)
    return _csr_from_mask(keep, [acts, z])


def jumprelu_encode_backward(grad_acts: Tensor, x: Tensor, W_enc: Tensor, threshold: Tensor,
                             row_offsets: Tensor, feat_idx: Tensor, pre_acts: Tensor,
                             bandwidth: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_acts * acts) w.r.t. x, W_enc, b_enc and (straight-through) threshold."""
    theta = threshold[feat_idx]
    grad_z = grad_acts * (pre_acts > theta)
    grad_x, grad_W_enc, grad_b_enc = _sparse_linear_backward(grad_z, x, W_enc, row_offsets, feat_idx)
    grad_threshold = torch.zeros_like(threshold)
    if bandwidth > 0:
        in_band = (pre_acts - theta).abs() < bandwidth / 2
        grad_threshold.index_add_(0, feat_idx, grad_acts * in_band * (-theta / bandwidth))
    return grad_x, grad_W_enc, grad_b_enc, grad_threshold


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest z = x @ W_enc + b_enc per row, ReLU'd; CSR with k entries a row, ascending features."""
    z = x @ W_enc + b_enc
    top = z.topk(k, dim=1).indices.sort(dim=1).values  # [N, k]
    acts = z.gather(1, top).relu()
    row_offsets = torch.arange(x.shape[0] + 1, device=x.device, dtype=torch.int64) * k
    return row_offsets, top.reshape(-1), acts.reshape(-1)


def topk_encode_backward(grad_acts: Tensor, x: Tensor, W_enc: Tensor, row_offsets: Tensor,
                         feat_idx: Tensor, acts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum(grad_acts * acts) w.r.t. x, W_enc, b_enc with the top-k selection fixed."""
    return _sparse_linear_backward(grad_acts * (acts > 0), x, W_enc, row_offsets, feat_idx)


def _sparse_linear_backward(grad_z: Tensor, x: Tensor, W_enc: Tensor, row_offsets: Tensor,
                            feat_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    rows = _rows_of(row_offsets)
    dense = torch.zeros(x.shape[0], W_enc.shape[1], dtype=grad_z.dtype, device=x.device)
    dense.index_put_((rows, feat_idx), grad_z, accumulate=True)  # [N, d_sae]
    return dense @ W_enc.T, x.T @ dense, dense.sum(0)


def sparse_decode(row_offsets: Tensor, feat_idx: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """out[i, o, :] = sum_{j in row i} acts[j] * W_dec[feat_idx[j], o, :] -> [N, n_out, d_model]."""
    n_rows = row_offsets.numel() - 1
    out = torch.zeros(n_rows, *W_dec.shape[1:], dtype=W_dec.dtype, device=W_dec.device)
    out.index_add_(0, _rows_of(row_offsets), acts[:, None, None] * W_dec[feat_idx])
    return out


def sparse_decode_backward(grad_out: Tensor, row_offsets: Tensor, feat_idx: Tensor, acts: Tensor,
                           W_dec: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_acts [nnz], grad_W_dec [d_sae, n_out, d_model]) of sum(grad_out * sparse_decode(...))."""
    g = grad_out[_rows_of(row_offsets)]  # [nnz, n_out, d_model]
    grad_acts = (g * W_dec[feat_idx]).sum(dim=(1, 2))
    grad_W_dec = torch.zeros_like(W_dec).index_add_(0, feat_idx, acts[:, None, None] * g)
    return grad_acts, grad_W_dec


def attribution_contract(grad: Tensor, pos: Tensor, W_dec: Tensor, feat_idx: Tensor,
                         acts: Tensor) -> Tensor:
    """edges[b, s] = acts[s] * <W_dec[feat_idx[s]], grad[b, pos[s]]> -> [B, S]."""
    return (grad[:, pos, :] * W_dec[feat_idx][None]).sum(-1) * acts


def gather_columns(W_enc: Tensor, feat_idx: Tensor) -> Tensor:
    """out[t, :] = W_enc[:, feat_idx[t]] -> [T, d_in]."""
    return W_enc[:, feat_idx].T.contiguous()


def _edge_scores(edges: Tensor, scale: Tensor, weight: Tensor, block: Tensor) -> Tensor:
    """s = (|edges| / scale) * weight on the block (a [R, N] bool), 0 elsewhere."""
    return (edges.abs() / scale[:, None] * weight[:, None]).masked_fill_(~block, 0)


def edge_abs_row_sums(edges: Tensor, row_mask: Tensor, col_mask: Tensor) -> Tensor:
    """[R] float64: sum_j |edges[i, j]| over the block row_mask x col_mask."""
    block = row_mask[:, None] & col_mask[None]
    return edges.abs().masked_fill_(~block, 0).sum(1, dtype=torch.float64)


def edge_score_col_sums(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                        col_mask: Tensor) -> Tensor:
    """[N] float64: sum_i s[i, j], s = (|edges| / scale) * weight on the block."""
    s = _edge_scores(edges, scale, weight, row_mask[:, None] & col_mask[None])
    return s.sum(0, dtype=torch.float64)


def edge_score_histogram(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                         col_mask: Tensor) -> Tensor:
    """[65536] float64: sum of the block's scores per bucket (bit pattern >> (bits - 17))."""
    s = _edge_scores(edges, scale, weight, row_mask[:, None] & col_mask[None]).flatten()
    as_int, shift = (torch.int32, 15) if s.dtype == torch.float32 else (torch.int64, 47)
    sums = torch.zeros(1 << 16, dtype=torch.float64)
    return sums.index_add_(0, (s.view(as_int) >> shift).long(), s.double())


def edge_score_mask(edges: Tensor, scale: Tensor, weight: Tensor, row_mask: Tensor,
                    col_mask: Tensor, min_score: float, band_end: float) -> tuple[Tensor, ...]:
    """mask [R, N] = block & (s >= min_score), its row and column counts, and the entries of
    the mask with s < band_end, row-major: (mask, n_in, n_out, rows, cols, scores)."""
    block = row_mask[:, None] & col_mask[None]
    s = _edge_scores(edges, scale, weight, block)
    mask = block & (s >= min_score)
    rows, cols = (mask & (s < band_end)).nonzero(as_tuple=True)
    return mask, mask.sum(1), mask.sum(0), rows, cols, s[rows, cols]


def normalize_rows(edges: Tensor) -> Tensor:
    """``Â = |edges|`` with each row divided by its sum (at least 1e-10, so rows of zeros stay
    zero): the twin of the row scaling of :mod:`cltrace.graph.influence`."""
    out = edges.abs()
    return out.div_(out.sum(dim=1, keepdim=True, dtype=torch.float64).clamp(min=1e-10).to(out.dtype))


def compute_influence(norm_rows: Tensor, targets: Tensor, weights: Tensor,
                      max_iter: int = 1000) -> Tensor:
    """``wᵀ(Â + Â² + …)`` (float64) for the dense ``Â [N, N]`` whose rows ``targets`` are
    ``norm_rows [n_targets, N]`` (all other rows zero): the plain power series, the twin of
    :func:`cltrace.graph.influence_of_rows`."""
    n = norm_rows.shape[1]
    A = torch.zeros(n, n, dtype=torch.float64)
    A[targets] = norm_rows.double()
    total, current = torch.zeros(n, dtype=torch.float64), weights.double()
    for _ in range(max_iter + 1):
        current = current @ A
        if not current.any():
            return total
        total += current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations (is the graph cyclic?)")
