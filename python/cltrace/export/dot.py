"""Graphviz rendering of a pruned attribution graph.

Layers are ranks (tokens at the bottom, then layer 0 ... n_layers-1, logits at the top);
labels give the feature id, position/token and activation; edges are coloured by sign
(blue positive, red negative) with width growing with |weight|. Pictures of thousands of
nodes are unreadable (and slow to lay out), so at most ``max_nodes`` nodes are drawn (the
tokens and logits, then the pruned graph's features and errors of highest influence) and at
most ``max_edges`` edges among them, the strongest by |weight|.
``render`` calls the ``dot`` binary (Debian package ``graphviz``) for SVG/PNG.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..graph.graph import Graph, NodeKind
from ..atomic import atomic_write_text
from ..graph.pruning import PruneResult, prune

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"
FILL = {NodeKind.FEATURE: "#fdf6e3", NodeKind.ERROR: "#e0e0e0", NodeKind.TOKEN: "#d9f0d3",
        NodeKind.LOGIT: "#fde0ef"}


def _quote(text: str) -> str:
    """Token text shown safely inside a label (newlines and control characters escaped)."""
    shown = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return f"“{shown}”" if shown else "“”"


def _select(graph: Graph, result: PruneResult, max_nodes: int, max_edges: int):
    """Nodes and edges to draw: tokens and logits, the most influential features/errors, the
    strongest edges among them, and no feature/error left without a drawn edge."""
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
    return nodes, edges, capped


def to_dot(graph: Graph, result: Optional[PruneResult] = None, *, max_nodes: int = 60,
           max_edges: int = 200):
    """A ``graphviz.Digraph`` of ``graph`` as pruned by ``result`` (default: :func:`prune` at
    its default thresholds), at most ``max_nodes`` nodes (see module doc)."""
    import graphviz

    result = result if result is not None else prune(graph)
    table, ids = graph.nodes(), graph.node_ids()
    nodes, edges, capped = _select(graph, result, max_nodes, max_edges)
    dot = graphviz.Digraph(name="attribution", graph_attr={
        "rankdir": "BT", "ranksep": "0.5", "nodesep": "0.15", "fontname": "Helvetica",
        "label": f"{graph.prompt!r} — {graph.model_name}"
                 + (f" (top {max_nodes} nodes, {max_edges} edges)" if capped else ""), "labelloc": "t"},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"},
        edge_attr={"arrowsize": "0.4"})
    by_rank: dict[int, list[int]] = {}
    for i in nodes:
        kind = NodeKind(int(table.kind[i]))
        layer, pos = int(table.layer[i]), int(table.pos[i])
        tok = _quote(graph.token_strs[pos])
        if kind == NodeKind.FEATURE:
            label = f"L{layer} #{int(table.feature[i])}\n@{pos} {tok}\na={float(table.activation[i]):.3g}"
        elif kind == NodeKind.ERROR:
            label = f"error L{layer}\n@{pos} {tok}"
        elif kind == NodeKind.TOKEN:
            label = f"{tok}\n@{pos}"
        else:
            j = i - graph.logit_start
            label = f"→ {_quote(graph.logit_labels[j])}\np={float(graph.logit_probs[j]):.3f}"
        dot.node(ids[i], label=label, fillcolor=FILL[kind],
                 shape="ellipse" if kind in (NodeKind.TOKEN, NodeKind.LOGIT) else "box")
        by_rank.setdefault(layer, []).append(i)
    # One rank per layer, stacked bottom (tokens) to top (logits) by an invisible chain.
    ranks = sorted(by_rank)
    for layer in ranks:
        with dot.subgraph() as s:
            s.attr(rank="same")
            s.node(f"rank_{layer}", label="E" if layer == -1 else "out" if layer == graph.n_layers
                   else f"L{layer}", shape="plaintext", style="", fontcolor="#888888")
            for i in by_rank[layer]:
                s.node(ids[i])
    for lo, hi in zip(ranks, ranks[1:]):
        dot.edge(f"rank_{lo}", f"rank_{hi}", style="invis")
    scale = max((abs(w) for _, _, w in edges), default=1.0)
    for t, s, w in edges:
        width = 0.3 + 3.7 * abs(w) / scale
        dot.edge(ids[s], ids[t], color=POSITIVE if w >= 0 else NEGATIVE,
                 penwidth=f"{width:.2f}", tooltip=f"{w:.4g}")
    return dot


def render(graph: Graph, path: str | Path, fmt: str = "svg", **kwargs) -> Path:
    """Write the DOT source (``fmt='dot'``) or a picture rendered by Graphviz's ``dot``."""
    path = Path(path)
    source = to_dot(graph, **kwargs).source
    if fmt == "dot":
        atomic_write_text(path, source)
        return path
    if fmt not in ("svg", "png", "pdf"):
        raise ValueError(f"unknown format {fmt!r}: use dot, svg, png or pdf")
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError(f"cannot render {path.name}: the Graphviz 'dot' program is not installed "
                           "(Debian/Ubuntu: apt-get install graphviz); the .dot source can still be written")
    import subprocess

    tmp = path.with_name(f".{path.name}.tmp")
    proc = subprocess.run([exe, f"-T{fmt}", "-o", str(tmp)], input=source.encode(), capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"dot failed to render {path}: {proc.stderr.decode(errors='replace')}")
    tmp.replace(path)
    return path
