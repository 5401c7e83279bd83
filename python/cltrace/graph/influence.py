"""Influence of every node of an attribution graph on its logits.

``Â = |A|`` row-normalised; influence ``I = wᵀ(Â + Â² + …)`` from the logit weights ``w``
(Ameisen et al. 2025, https://transformer-circuits.pub/2025/attribution-graphs/methods.html).
Only targets have incoming edges, so the power series runs on ``Â[:, targets]`` (targets x
targets, gathered once) and one more pass spreads it to all N columns:
``I = (w + I)[targets] · Â``. The edge rows are never copied: ``Â`` is computed on the fly by
the compiled passes of :mod:`cltrace.ops`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import ops
from .graph import Graph


def abs_row_scale(row_sums: Tensor, dtype: torch.dtype) -> Tensor:
    """The divisor of each row in ``Â``: its float64 sum, at least 1e-10, in the edges' dtype."""
    return row_sums.clamp(min=1e-10).to(dtype)


def _series_on_targets(block: Tensor, seed: Tensor, max_iter: int = 1000) -> Tensor:
    """``seed·(B + B² + …)`` (float64) for ``B = Â[:, targets] [n_targets, n_targets]``: the
    influence at the target nodes. Each product is taken in ``B``'s dtype, over the rows
    between the first and the last non-zero coefficient only; the graph is acyclic, so the
    series ends after at most (depth) terms."""
    total = torch.zeros(seed.shape, dtype=torch.float64)
    current = seed
    for _ in range(max_iter + 1):
        nonzero = current.nonzero()
        if not len(nonzero):
            return total
        lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
        current = (current[lo:hi].to(block.dtype) @ block[lo:hi]).double()
        total += current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations (is the graph cyclic?)")


def output_influence(edges: Tensor, targets: Tensor, w: Tensor, scale: Tensor,
                      rows: Optional[Tensor] = None, cols: Optional[Tensor] = None) -> Tensor:
    """``(I + w)`` at the targets (float64) for ``Â = |edges| / scale`` restricted to the block
    ``rows x cols`` (default: everything)."""
    block = _columns(edges, targets).abs_().div_(scale[:, None])  # Â[:, targets]
    if rows is not None:
        block.masked_fill_(~(rows[:, None] & cols[targets][None]), 0)
    return w + _series_on_targets(block, w)


def _columns(edges: Tensor, idx: Tensor) -> Tensor:
    """``edges[:, idx]``, copied by slices where ``idx`` runs consecutively (features, logits)."""
    starts = torch.cat([torch.tensor([0]), (idx.diff() != 1).nonzero().flatten() + 1]).tolist()
    if len(starts) > 64:
        return edges.index_select(1, idx)
    ends = starts[1:] + [len(idx)]
    return torch.cat([edges[:, int(idx[a]):int(idx[b - 1]) + 1] for a, b in zip(starts, ends)], 1)


def influence_of_rows(edges: Tensor, targets: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """(influence [N] float64, row scale of ``Â`` [n_targets]) for the edge rows
    ``edges [n_targets, N]`` of the nodes ``targets`` and node weights ``weights [N]``: as
    ``compute_influence(normalize_rows(edges), targets, weights)`` but with two reads of the
    edges (row sums; ``(I + w)[targets] · Â``) and no copy of them."""
    rows, cols = everything(edges)
    scale = abs_row_scale(ops.edge_abs_row_sums(edges, rows, cols), edges.dtype)
    out = output_influence(edges, targets, weights[targets], scale)
    return ops.edge_score_col_sums(edges, scale, out.to(edges.dtype), rows, cols), scale


def graph_influence(graph: Graph) -> tuple[Tensor, Tensor]:
    """:func:`influence_of_rows` of the unpruned graph."""
    return influence_of_rows(graph.edges, graph.edge_targets, graph.logit_weights())


def everything(edges: Tensor) -> tuple[Tensor, Tensor]:
    """(rows [n_targets], columns [N]) boolean masks that select every edge of ``edges``."""
    return (torch.ones(edges.shape[0], dtype=torch.bool), torch.ones(edges.shape[1], dtype=torch.bool))
