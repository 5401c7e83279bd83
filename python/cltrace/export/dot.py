"""Graphviz rendering of a pruned attribution graph.

Layers are ranks (tokens at the bottom, then layer 0 ... n_layers-1, logits at the top);
labels give the feature id, position/token and activation; edges are coloured by sign
(blue positive, red negative) with width growing with |weight|. Pictures of thousands of
nodes are unreadable (and slow to lay out), so at most ``max_nodes`` nodes are drawn (the
tokens and logits, then the pruned graph's features and errors of highest influence) and at
most ``max_edges`` edges among them, the strongest by |weight|
(:func:`.selection.select_blocks`).
An image + text graph draws each image's soft tokens as one labelled block in the token rank
(``image1``, ...: file, grid, positions) whose edge into a node sums its soft tokens' edges.
``render`` writes the DOT source, an SVG drawn in Python (:mod:`.svg`, no Graphviz needed), or
calls the ``dot`` binary (Debian package ``graphviz``) for PNG/PDF.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..graph.graph import Graph, NodeKind
from ..atomic import atomic_write_text
from ..graph.pruning import PruneResult, prune
from .selection import FILL, NEGATIVE, POSITIVE, select_blocks


def _quote(text: str) -> str:
    """Token text shown safely inside a label (newlines and control characters escaped)."""
    shown = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return f"“{shown}”" if shown else "“”"


def to_dot(graph: Graph, result: Optional[PruneResult] = None, *, max_nodes: int = 60,
           max_edges: int = 200):
    """A ``graphviz.Digraph`` of ``graph`` as pruned by ``result`` (default: :func:`prune` at
    its default thresholds), at most ``max_nodes`` nodes (see module doc)."""
    import graphviz

    result = result if result is not None else prune(graph)
    table, ids = graph.nodes(), graph.node_ids()
    (nodes, edges, capped), images = select_blocks(graph, result, max_nodes, max_edges)
    dot = graphviz.Digraph(name="attribution", graph_attr={
        "rankdir": "BT", "ranksep": "0.5", "nodesep": "0.15", "fontname": "Helvetica",
        "label": f"{graph.prompt!r} — {graph.model_name}"
                 + (f" (top {max_nodes} nodes, {max_edges} edges)" if capped else ""), "labelloc": "t"},
        node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"},
        edge_attr={"arrowsize": "0.4"})
    by_rank: dict[int, list[int | str]] = {}  # (str: an image block's id)
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
    for b in images.blocks:  # an image's soft tokens: one block in the token rank
        dot.node(b.node_id, label=f"{b.label}: {_quote(b.file)}\n{b.rows}×{b.cols} soft tokens\n@{b.first}–{b.last}",
                 fillcolor=FILL[NodeKind.TOKEN], shape="box3d", style="filled")
        by_rank.setdefault(-1, []).append(b.node_id)
    # One rank per layer, stacked bottom (tokens) to top (logits) by an invisible chain.
    ranks = sorted(by_rank)
    for layer in ranks:
        with dot.subgraph() as s:
            s.attr(rank="same")
            s.node(f"rank_{layer}", label="E" if layer == -1 else "out" if layer == graph.n_layers
                   else f"L{layer}", shape="plaintext", style="", fontcolor="#888888")
            for i in by_rank[layer]:
                s.node(i if isinstance(i, str) else ids[i])
    for lo, hi in zip(ranks, ranks[1:]):
        dot.edge(f"rank_{lo}", f"rank_{hi}", style="invis")
    scale = max([abs(w) for _, _, w in edges] + [abs(e[2]) for e in images.edges], default=1.0)
    for t, s, w in edges:
        width = 0.3 + 3.7 * abs(w) / scale
        dot.edge(ids[s], ids[t], color=POSITIVE if w >= 0 else NEGATIVE,
                 penwidth=f"{width:.2f}", tooltip=f"{w:.4g}")
    for t, k, w, n in images.edges:
        width = 0.3 + 3.7 * abs(w) / scale
        dot.edge(images.blocks[k].node_id, ids[t], color=POSITIVE if w >= 0 else NEGATIVE,
                 penwidth=f"{width:.2f}", tooltip=f"{w:.4g} (sum of {n} soft-token edges)")
    return dot


def render(graph: Graph, path: str | Path, fmt: str = "svg", **kwargs) -> Path:
    """Write the DOT source (``fmt='dot'``), the SVG of :func:`.svg.to_svg` (``fmt='svg'``, pure
    Python) or a PNG/PDF rendered by Graphviz's ``dot``; ``kwargs`` go to the drawing function."""
    path = Path(path)
    if fmt == "svg":
        from .svg import write_svg

        return write_svg(graph, path, **kwargs)
    source = to_dot(graph, **kwargs).source
    if fmt == "dot":
        atomic_write_text(path, source)
        return path
    if fmt not in ("png", "pdf"):
        raise ValueError(f"unknown format {fmt!r}: use dot, svg, png or pdf")
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError(f"cannot render {path.name}: the Graphviz 'dot' program is not installed "
                           "(Debian/Ubuntu: apt-get install graphviz); the .dot and .svg can still be written")
    import subprocess

    tmp = path.with_name(f".{path.name}.tmp")
    proc = subprocess.run([exe, f"-T{fmt}", "-o", str(tmp)], input=source.encode(), capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"dot failed to render {path}: {proc.stderr.decode(errors='replace')}")
    tmp.replace(path)
    return path
