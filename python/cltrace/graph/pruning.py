"""Pruning an attribution graph by influence on the logits, and the graph's scores.

Following Ameisen et al. 2025 (https://transformer-circuits.pub/2025/attribution-graphs/methods.html)
and circuit-tracer's implementation of it:

* ``Â = |A|`` row-normalised; influence ``I = wᵀ(Â + Â² + …)`` from the logit weights ``w``;
* keep the nodes holding ``node_threshold`` of the cumulative influence (tokens and logits always);
* on the node-pruned graph, score edges by ``Â_ij · (I_i + w_i)`` and keep ``edge_threshold`` of
  the cumulative score; then repeatedly drop feature/error nodes left without outgoing edges
  and features left without incoming edges.

Everything works on the target rows ``graph.edges [n_targets, N]`` and never copies them:
``Â``, the pruned graph and the edge scores are computed on the fly by the compiled passes of
:mod:`cltrace.ops` (``edge_*``), each reading the edges once. Since only targets have incoming
edges, the power series runs on ``Â[:, targets]`` (targets x targets, gathered once per graph)
and one more pass spreads the result to all N columns: ``I = (w + I)[targets] · Â``. A prune
reads all rows twice (row sums; influence), the rows of kept targets three times (row sums of
the pruned graph; a histogram of the scores' bit patterns, which locates the cumulative cut;
the edge mask, listing the cut's bucket, which alone is sorted) and the target columns twice,
and writes the [n_targets, N] bool edge mask once. The dangling-node loop then keeps per-node
edge counts and reads only the edges of the nodes it drops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..errors import UsageError
from ..settings import option
from .graph import Graph
from .influence import abs_row_scale, graph_influence, output_influence

_SORT_LIMIT = 1 << 22  # up to this many scores, find_threshold simply sorts
_CHUNK = 1 << 24  # scores processed per chunk by the histogram path
_N_BUCKETS = 1 << 16  # histogram of bit patterns >> (bits - 17): exponent and top mantissa bits


def check_threshold(value: float, name: str) -> float:
    """``value`` as a float if it is in (0, 1], else a UsageError naming ``name``."""
    if not (0.0 < value <= 1.0):
        raise UsageError(f"{name} must be in (0, 1], got {value}")
    return float(value)


@dataclass(frozen=True)
class PruneSettings:
    """How much of the influence on the logits pruning keeps (defaults: Neuronpedia's)."""

    node_threshold: float = option(0.8, "cumulative influence kept by node pruning, in (0, 1]",
                                   metavar="X")
    edge_threshold: float = option(0.85, "cumulative influence kept by edge pruning, in (0, 1]; "
                                   "Neuronpedia's default (circuit-tracer's CLI: 0.98, which keeps "
                                   "2-3x the links)", metavar="Y")

    def check(self) -> "PruneSettings":
        """Raise a UsageError naming the option of a threshold outside (0, 1]."""
        check_threshold(self.node_threshold, "--node-threshold")
        check_threshold(self.edge_threshold, "--edge-threshold")
        return self


class PruneResult(NamedTuple):
    node_mask: Tensor  # [N] bool: nodes kept
    edge_mask: Tensor  # [n_targets, N] bool: edges kept (rows as graph.edge_targets)
    cumulative_scores: Tensor  # [N] float64: cumulative influence fraction up to each node's rank
    influence: Tensor  # [N] float64: influence of each node on the logits
    row_scale: Tensor  # [n_targets]: the divisor of each row of Â (its sum of |edges|)
    settings: PruneSettings  # the thresholds these masks were cut at


# --- cumulative cut-off ------------------------------------------------------------------------

def _bit_buckets(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(integer view, shift) mapping a non-negative score to its histogram bucket."""
    return (torch.int32, 15) if dtype == torch.float32 else (torch.int64, 47)


def _cut_bucket(sums: Tensor, fraction: float, total: float) -> tuple[int, float]:
    """(bucket holding the cut, sum of the scores in higher buckets) from per-bucket sums."""
    above = sums.flip(0).cumsum(0).flip(0)  # above[b] = sum of scores in buckets >= b
    b = int((above >= fraction * total).nonzero().max())  # highest bucket whose suffix reaches it
    return b, float(above[b + 1]) if b + 1 < len(sums) else 0.0


def find_threshold(scores: Tensor, fraction: float) -> float:
    """The largest score ``t`` such that the scores ``>= t`` hold ``fraction`` of the total.

    Equal to sorting descending and taking the first value whose cumulative share reaches
    ``fraction`` (never below the smallest non-zero score), without sorting everything:
    a histogram of the scores' IEEE bit patterns locates the bucket holding the cut, and only
    that bucket is sorted."""
    flat = scores.reshape(-1)
    if flat.numel() == 0:
        return 0.0
    if fraction >= 1.0:  # everything: the cut is the smallest non-zero score (exactly)
        nonzero = flat[flat > 0]
        return float(nonzero.min()) if nonzero.numel() else 0.0
    if flat.numel() <= _SORT_LIMIT:
        return _threshold_by_sort(flat.double(), 0.0, float(flat.sum(dtype=torch.float64)), fraction)
    as_int, shift = _bit_buckets(flat.dtype)
    sums = torch.zeros(_N_BUCKETS, dtype=torch.float64)
    for chunk in flat.split(_CHUNK):
        sums.index_add_(0, (chunk.view(as_int) >> shift).long(), chunk.double())
    total = float(sums.sum())
    if total == 0:
        return 0.0
    b, higher = _cut_bucket(sums, fraction, total)
    in_bucket = torch.cat([c[(c.view(as_int) >> shift).long() == b] for c in flat.split(_CHUNK)])
    return _threshold_by_sort(in_bucket.double(), higher, total, fraction)


def _threshold_by_sort(values: Tensor, higher: float, total: float, fraction: float) -> float:
    """Cut-off among ``values`` given ``higher``, the sum of all scores above them."""
    if total == 0:
        return 0.0
    ordered = values.sort(descending=True).values
    share = (ordered.cumsum(0) + higher) / total
    idx = int(torch.searchsorted(share, torch.tensor([fraction], dtype=share.dtype)))
    n_nonzero = int((ordered > 0).sum())
    idx = min(idx, max(n_nonzero - 1, 0))
    return float(ordered[idx])


def _edge_cut(edges: Tensor, scale: Tensor, weight: Tensor, rows: Tensor, cols: Tensor,
              fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """(mask [R, N] of the entries of the block ``rows x cols`` whose score
    ``|edges| / scale * weight`` is at least ``find_threshold`` of all the block's scores
    (zeros included when that cut is 0, as ``scores >= 0``), its column counts [N] (edges
    leaving each node), its row counts [R]). Two reads of the block: a histogram locates the
    cut's bucket; then the mask of the entries in that bucket or above, listing the bucket's
    own entries, which are sorted to find the cut and cleared below it."""
    sums = ops.edge_score_histogram(edges, scale, weight, rows, cols)
    total = float(sums.sum())
    if total == 0:
        m = ops.edge_score_mask(edges, scale, weight, rows, cols, 0.0, 0.0)
        return m.mask, m.n_out, m.n_in
    as_int, shift = _bit_buckets(edges.dtype)
    b, higher = ((int(sums.nonzero().min()), 0.0) if fraction >= 1.0
                 else _cut_bucket(sums, fraction, total))
    floor = float(torch.tensor([max(b << shift, 1)], dtype=as_int).view(edges.dtype))  # > 0
    if fraction >= 1.0:  # the cut is the smallest non-zero score: everything from its bucket on
        m = ops.edge_score_mask(edges, scale, weight, rows, cols, floor, floor)
        return m.mask, m.n_out, m.n_in
    ceil = (float(torch.tensor([(b + 1) << shift], dtype=as_int).view(edges.dtype))
            if b + 1 < _N_BUCKETS else float("inf"))
    m = ops.edge_score_mask(edges, scale, weight, rows, cols, floor, ceil)
    t = _threshold_by_sort(m.band_scores.double(), higher, total, fraction)
    below = m.band_scores < t
    r, c = m.band_rows[below], m.band_cols[below]
    m.mask[r, c] = False
    return (m.mask, m.n_out - torch.bincount(c, minlength=len(m.n_out)),
            m.n_in - torch.bincount(r, minlength=len(m.n_in)))


# --- pruning ------------------------------------------------------------------------------------

def _drop_dangling(graph: Graph, node_mask: Tensor, edge_mask: Tensor, n_out: Tensor,
                   n_in: Tensor) -> Tensor:
    """Repeatedly drop feature/error nodes without an outgoing edge and features without an
    incoming one, and the edges of dropped nodes (in ``edge_mask``, in place), until nothing
    changes; returns the node mask. The edge counts ``n_out [N]``, ``n_in [R]`` are kept up
    to date by reading only the rows and columns of the nodes dropped in each round."""
    targets, always = graph.edge_targets, graph.token_start
    n_rows, n_nodes = edge_mask.shape
    row_of = torch.full((n_nodes,), -1, dtype=torch.int64)
    row_of[targets] = torch.arange(n_rows)
    feature_row = targets < graph.n_features
    while True:
        drop = torch.zeros_like(node_mask)
        drop[:always] = node_mask[:always] & (n_out[:always] == 0)  # features/errors need an output
        drop[targets[feature_row & (n_in == 0) & node_mask[targets]]] = True  # features need an input
        if not drop.any():
            return node_mask
        node_mask &= ~drop
        dropped_rows = row_of[drop]
        dropped_rows = dropped_rows[dropped_rows >= 0]
        n_out -= torch.bincount(edge_mask[dropped_rows].nonzero()[:, 1], minlength=n_nodes)
        edge_mask[dropped_rows] = False
        dropped = drop.nonzero().flatten()
        n_in -= torch.bincount(edge_mask[:, dropped].nonzero()[:, 0], minlength=n_rows)
        edge_mask[:, dropped] = False
        n_in[dropped_rows] = 0
        n_out[dropped] = 0


def prune(graph: Graph, node_threshold: float = PruneSettings.node_threshold,
          edge_threshold: float = PruneSettings.edge_threshold) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits (see module
    doc); the result records the thresholds it was cut at."""
    check_threshold(node_threshold, "node_threshold")
    check_threshold(edge_threshold, "edge_threshold")
    edges, targets = graph.edges, graph.edge_targets

    influence, row_scale = graph_influence(graph)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[graph.token_start:] = True  # tokens and logits are always kept

    # The node-pruned graph: rows of kept targets, columns of kept nodes.
    rows = node_mask[targets]
    scale = abs_row_scale(ops.edge_abs_row_sums(edges, rows, node_mask), edges.dtype)
    out = output_influence(edges, targets, graph.logit_weights()[targets], scale, rows, node_mask)
    edge_mask, n_out, n_in = _edge_cut(edges, scale, out.to(edges.dtype), rows, node_mask, edge_threshold)
    node_mask = _drop_dangling(graph, node_mask, edge_mask, n_out, n_in)

    order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = order.values.cumsum(0) / influence.sum().clamp(min=1e-300)
    return PruneResult(node_mask, edge_mask, cumulative, influence, row_scale,
                       PruneSettings(node_threshold, edge_threshold))


