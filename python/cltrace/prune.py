"""Pruning an attribution graph by influence on the logits, and the graph's scores.

Following Ameisen et al. 2025 (https://transformer-circuits.pub/2025/attribution-graphs/methods.html)
and circuit-tracer's implementation of it:

* ``Â = |A|`` row-normalised; influence ``I = wᵀ(Â + Â² + …)`` from the logit weights ``w``;
* keep the nodes holding ``node_threshold`` of the cumulative influence (tokens and logits always);
* on the node-pruned graph, score edges by ``Â_ij · (I_i + w_i)`` and keep ``edge_threshold`` of
  the cumulative score; then repeatedly drop feature/error nodes left without outgoing edges
  and features left without incoming edges.

Everything works on the target rows ``graph.edges [n_targets, N]``: memory is targets x nodes,
and the cumulative cut-off is found by a histogram over the scores' bit patterns plus a sort of
one bucket, so no N² sort is ever done.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .graph import Graph

_SORT_LIMIT = 1 << 22  # up to this many scores, find_threshold simply sorts
_CHUNK = 1 << 24  # scores processed per chunk by the histogram path


class PruneResult(NamedTuple):
    node_mask: Tensor  # [N] bool: nodes kept
    edge_mask: Tensor  # [n_targets, N] bool: edges kept (rows as graph.edge_targets)
    cumulative_scores: Tensor  # [N] float64: cumulative influence fraction up to each node's rank
    influence: Tensor  # [N] float64: influence of each node on the logits


class GraphScores(NamedTuple):
    replacement: float  # fraction of token->logit influence that flows through features, not errors
    completeness: float  # influence-weighted fraction of node inputs not coming from error nodes


def check_threshold(value: float, name: str) -> float:
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def normalize_rows(edges: Tensor) -> Tensor:
    """``|edges|`` with each row divided by its sum (rows of zeros stay zero)."""
    out = edges.abs()
    return out.div_(out.sum(dim=1, keepdim=True, dtype=torch.float64).clamp(min=1e-10).to(out.dtype))


def compute_influence(norm_rows: Tensor, targets: Tensor, weights: Tensor,
                      max_iter: int = 1000) -> Tensor:
    """``wᵀ(Â + Â² + …)`` for ``Â`` given by its rows ``norm_rows [n_targets, N]`` at ``targets``.

    The graph is acyclic, so the series ends after at most (depth) terms."""
    current = (weights[targets].to(norm_rows.dtype) @ norm_rows).double()
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = (current[targets].to(norm_rows.dtype) @ norm_rows).double()
        total += current
    raise RuntimeError(f"influence did not converge after {max_iter} iterations (is the graph cyclic?)")


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
    bits = 32 if flat.dtype == torch.float32 else 64
    as_int = {32: torch.int32, 64: torch.int64}[bits]
    shift = bits - 17  # 16 bits of bucket: sign (always 0) + exponent + top mantissa bits
    n_buckets = 1 << 16
    sums = torch.zeros(n_buckets, dtype=torch.float64)
    for chunk in flat.split(_CHUNK):
        bucket = (chunk.view(as_int) >> shift).long()
        sums.index_add_(0, bucket, chunk.double())
    total = float(sums.sum())
    if total == 0:
        return 0.0
    above = sums.flip(0).cumsum(0).flip(0)  # above[b] = sum of scores in buckets >= b
    target = fraction * total
    b = int((above >= target).nonzero().max())  # highest bucket whose suffix reaches the target
    higher = float(above[b + 1]) if b + 1 < n_buckets else 0.0
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


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence on the logits (see module doc)."""
    check_threshold(node_threshold, "node_threshold")
    check_threshold(edge_threshold, "edge_threshold")
    targets, w = graph.edge_targets, graph.logit_weights()
    always = graph.token_start  # tokens and logits are always kept

    influence = compute_influence(normalize_rows(graph.edges), targets, w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[always:] = True

    pruned = graph.edges.clone()
    pruned[~node_mask[targets]] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize_rows(pruned)
    del pruned
    out_influence = compute_influence(norm, targets, w) + w
    norm.mul_(out_influence[targets].to(norm.dtype)[:, None])  # edge scores, in place
    edge_mask = norm >= find_threshold(norm, edge_threshold)
    del norm

    is_feature_row = targets < graph.n_features
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask[targets]] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:always] &= edge_mask[:, :always].any(0)  # features/errors need an outgoing edge
        has_input = edge_mask[is_feature_row].any(1)
        node_mask[targets[is_feature_row]] &= has_input  # features need an incoming edge
        if torch.equal(node_mask, before):
            break

    order = influence.sort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = order.values.cumsum(0) / influence.sum().clamp(min=1e-300)
    return PruneResult(node_mask, edge_mask, cumulative, influence)


def graph_scores(graph: Graph) -> GraphScores:
    """Replacement and completeness scores of the unpruned graph (Ameisen et al. 2025)."""
    targets, w = graph.edge_targets, graph.logit_weights()
    norm = normalize_rows(graph.edges)
    influence = compute_influence(norm, targets, w)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = float(influence[graph.token_start:graph.logit_start].sum())
    error_influence = float(influence[errors].sum())
    replacement = token_influence / max(token_influence + error_influence, 1e-300)
    non_error = torch.ones(graph.n_nodes, dtype=torch.float64)
    non_error[targets] = 1 - norm[:, errors].sum(-1, dtype=torch.float64)
    output_influence = influence + w
    completeness = float((non_error * output_influence).sum() / output_influence.sum())
    return GraphScores(replacement, completeness)
