"""What the pictures of a graph draw (shared by the DOT and SVG exports): the nodes and edges
chosen by :func:`select`, the sign colours of edges and the fill colour of each node kind.

A graph of an image + text prompt (``graph.info["images"]``, docs/interop.md "Images") has one
token node per soft token (256 per image for Gemma 3): the pictures draw each image's soft
tokens as one labelled block (:class:`Block`) instead, whose edge into a node is the sum of
the kept edges from that image's soft tokens into it (edges add: the sum is the soft tokens'
joint direct effect)."""
from __future__ import annotations

from typing import Any, NamedTuple

from ..graph.graph import Graph, NodeKind
from ..graph.pruning import PruneResult

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"  # edge colours by the sign of the weight
FILL = {NodeKind.FEATURE: "#fdf6e3", NodeKind.ERROR: "#e0e0e0", NodeKind.TOKEN: "#d9f0d3",
        NodeKind.LOGIT: "#fde0ef"}


class Block(NamedTuple):
    """An image's soft tokens drawn as one node: ``index`` (from 0, prompt order), its copy's
    ``file``, the prompt positions ``first`` .. ``last`` (inclusive) and its ``rows`` x ``cols``
    grid."""

    index: int
    file: str
    first: int
    last: int
    rows: int
    cols: int

    @property
    def node_id(self) -> str:
        return f"image{self.index + 1}"

    @property
    def label(self) -> str:
        return f"image {self.index + 1}"


class Selection(NamedTuple):
    """Nodes to draw (ascending node indices), edges ``(target, source, weight)`` strongest
    first, and whether the node cap left out pruned-in features/errors."""

    nodes: list[int]
    edges: list[tuple[int, int, float]]
    capped: bool


class Blocks(NamedTuple):
    """The image blocks of a selection (:func:`select_blocks`): their soft tokens' nodes are not
    in its ``nodes``; ``edges``: ``(target, block index, weight, n)``, the sum of ``n`` kept
    edges, strongest first."""

    blocks: list[Block]
    edges: list[tuple[int, int, float, int]]


def image_blocks(graph: Graph) -> list[Block]:
    """The :class:`Block` of each image of ``graph.info["images"]`` (none for a text graph)."""
    entries: Any = graph.info.get("images") or []
    return [Block(k, str(e["file"]), int(e["positions"][0]), int(e["positions"][1]),
                  int(e["grid"][0]), int(e["grid"][1])) for k, e in enumerate(entries)]


def select(graph: Graph, result: PruneResult, max_nodes: int, max_edges: int) -> Selection:
    """:func:`select_blocks` without the image blocks."""
    return select_blocks(graph, result, max_nodes, max_edges)[0]


def select_blocks(graph: Graph, result: PruneResult, max_nodes: int,
                  max_edges: int) -> tuple[Selection, Blocks]:
    """Nodes and edges to draw: all tokens and logits, the ``max_nodes`` minus that many
    features/errors of ``result``'s kept nodes with the highest influence on the logits (among
    those with a kept edge; ties: lower node index first), the ``max_edges`` kept edges of largest
    |weight| among the chosen nodes, and no feature/error left without a drawn edge. An image's
    soft tokens count as one node (its :class:`Block`), their edges into a node as one edge."""
    blocks = image_blocks(graph)
    rows, cols = result.edge_mask.nonzero(as_tuple=True)
    weights = graph.edges[rows, cols].tolist()
    targets, sources = graph.edge_targets[rows].tolist(), cols.tolist()
    used = set(targets) | set(sources)
    inner = [i for i in result.node_mask.nonzero().flatten().tolist()
             if i < graph.token_start and i in used]
    block_of = {graph.token_start + p: b.index for b in blocks for p in range(b.first, b.last + 1)}
    outer = [i for i in range(graph.token_start, graph.n_nodes) if i not in block_of]  # tokens and logits
    room = max(max_nodes - len(outer) - len(blocks), 0)
    capped = len(inner) > room
    chosen = set(sorted(inner, key=lambda i: -float(result.influence[i]))[:room]) | set(outer)
    if not blocks:
        edges = sorted(((t, s, w) for t, s, w in zip(targets, sources, weights)
                        if s in chosen and t in chosen), key=lambda e: -abs(e[2]))[:max_edges]
        touched = {t for t, _, _ in edges} | {s for _, s, _ in edges}
        nodes = [i for i in sorted(chosen) if i >= graph.token_start or i in touched]
        return Selection(nodes, edges, capped), Blocks([], [])
    summed: dict[tuple[int, int], list] = {}  # (target, block) -> [sum of weights, count]
    plain = []
    for t, s, w in zip(targets, sources, weights):
        if t not in chosen:
            continue
        if s in block_of:
            acc = summed.setdefault((t, block_of[s]), [0.0, 0])
            acc[0] += w
            acc[1] += 1
        elif s in chosen:
            plain.append((t, s, w, None))
    both = plain + [(t, b, w, n) for (t, b), (w, n) in summed.items()]
    both = sorted(both, key=lambda e: (-abs(e[2]), e[3] is not None))[:max_edges]
    edges = [(t, s, w) for t, s, w, n in both if n is None]
    block_edges = [(t, b, w, n) for t, b, w, n in both if n is not None]
    touched = {t for t, _, _ in edges} | {s for _, s, _ in edges} | {t for t, _, _, _ in block_edges}
    nodes = [i for i in sorted(chosen) if i >= graph.token_start or i in touched]
    return Selection(nodes, edges, capped), Blocks(blocks, block_edges)
