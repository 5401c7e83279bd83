"""What the pictures of a graph draw (shared by the DOT and SVG exports): the nodes and edges
chosen by :func:`select`, the sign colours of edges and the fill colour of each node kind."""
from __future__ import annotations

from typing import NamedTuple

from ..graph.graph import Graph, NodeKind
from ..graph.pruning import PruneResult

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"  # edge colours by the sign of the weight
FILL = {NodeKind.FEATURE: "#fdf6e3", NodeKind.ERROR: "#e0e0e0", NodeKind.TOKEN: "#d9f0d3",
        NodeKind.LOGIT: "#fde0ef"}


class Selection(NamedTuple):
    """Nodes to draw (ascending node indices), edges ``(target, source, weight)`` strongest
    first, and whether the node cap left out pruned-in features/errors."""

    nodes: list[int]
    edges: list[tuple[int, int, float]]
    capped: bool


def select(graph: Graph, result: PruneResult, max_nodes: int, max_edges: int) -> Selection:
    """Nodes and edges to draw: all tokens and logits, the ``max_nodes`` minus that many
    features/errors of ``result``'s kept nodes with the highest influence on the logits (among
    those with a kept edge; ties: lower node index first), the ``max_edges`` kept edges of largest
    |weight| among the chosen nodes, and no feature/error left without a drawn edge."""
    rows, cols = result.edge_mask.nonzero(as_tuple=True)
    weights = graph.edges[rows, cols].tolist()
    targets, sources = graph.edge_targets[rows].tolist(), cols.tolist()
    used = set(targets) | set(sources)
    inner = [i for i in result.node_mask.nonzero().flatten().tolist()
             if i < graph.token_start and i in used]
    outer = list(range(graph.token_start, graph.n_nodes))  # tokens and logits
    room = max(max_nodes - len(outer), 0)
    capped = len(inner) > room
    chosen = set(sorted(inner, key=lambda i: -float(result.influence[i]))[:room]) | set(outer)
    edges = sorted(((t, s, w) for t, s, w in zip(targets, sources, weights)
                    if s in chosen and t in chosen), key=lambda e: -abs(e[2]))[:max_edges]
    touched = {t for t, _, _ in edges} | {s for _, s, _ in edges}
    nodes = [i for i in sorted(chosen) if i >= graph.token_start or i in touched]
    return Selection(nodes, edges, capped)
