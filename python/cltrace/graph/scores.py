"""Replacement and completeness scores of an attribution graph (Ameisen et al. 2025)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ops
from .graph import Graph
from .influence import everything, graph_influence
from .pruning import PruneResult


class GraphScores(NamedTuple):
    replacement: float  # fraction of token->logit influence that flows through features, not errors
    completeness: float  # influence-weighted fraction of node inputs not coming from error nodes


def graph_scores(graph: Graph, pruned: Optional[PruneResult] = None) -> GraphScores:
    """Replacement and completeness scores of the unpruned graph (Ameisen et al. 2025); with
    the graph's :class:`PruneResult`, its influence is reused rather than computed again."""
    targets, w = graph.edge_targets, graph.logit_weights()
    influence, scale = (pruned.influence, pruned.row_scale) if pruned is not None else graph_influence(graph)
    errors = slice(graph.error_start, graph.token_start)
    token_influence = float(influence[graph.token_start:graph.logit_start].sum())
    error_influence = float(influence[errors].sum())
    replacement = token_influence / max(token_influence + error_influence, 1e-300)
    rows, error_cols = everything(graph.edges)
    error_cols[:] = False
    error_cols[errors] = True
    from_errors = ops.edge_abs_row_sums(graph.edges, rows, error_cols) / scale.double()  # Σ_errors Â_ij
    non_error = torch.ones(graph.n_nodes, dtype=torch.float64)
    non_error[targets] = 1 - from_errors
    output_influence = influence + w
    completeness = float((non_error * output_influence).sum() / output_influence.sum())
    return GraphScores(replacement, completeness)
