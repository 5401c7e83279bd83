"""SVG picture of a pruned attribution graph, drawn in pure Python (no Graphviz needed).

Layout, as in the offline viewer (serve/assets/viewer.js): x is the token position, y the
layer; tokens in the bottom row, then layers 0 … n_layers-1, the logits in the top row. Each
drawn node is a box of one fixed size in its cell (position, row): the nodes of a cell sit side
by side, at most ``PER_LINE`` of them (features by index, then the error node), and further
ones in more lines below. A column is as wide as its position's widest cell and a row as high as
its tallest (rows without drawn nodes are thin), so no two boxes overlap. Labels are cut to fit
their box (a monospace width estimate, emoji counted double); every node and edge carries a
``<title>`` tooltip with its full text. Token text is shown as in the viewer (space ␣, newline
⏎, tab ⇥, other control characters as Python escapes ``\\r``, ``\\xNN``) and escaped for XML.

The nodes and edges are those of the DOT export (:func:`.selection.select`: tokens, logits, the
most influential features/errors, the strongest edges). Edges are curves from the top of the
source to the bottom of the target, blue for positive and red for negative weights, of width
``0.3 + 3.7 |w| / max |w|`` (as Graphviz penwidth in :mod:`.dot`), weakest drawn first, under
the nodes. Identical inputs give byte-identical output.

An image + text graph draws each image's positions as one column labelled with the image and
its positions: its soft tokens as one block in the token row (their edges into a node summed,
:class:`.selection.Block`), the features and errors at its soft tokens in that column's cells.
"""
from __future__ import annotations

import math
import unicodedata
from pathlib import Path
from typing import Optional
from xml.sax.saxutils import escape

from ..atomic import atomic_write_text
from ..graph.graph import Graph, NodeKind
from ..graph.pruning import PruneResult, prune
from .selection import FILL, NEGATIVE, POSITIVE, select_blocks

W, H, GAP, VPAD = 80, 28, 6, 12  # node box, space between boxes, space above/below a row's boxes
PER_LINE = 4  # nodes side by side in one cell before a new line
EMPTY_ROW = 16  # height of a row without drawn nodes
ML, MR, MT, MB, MIN_WIDTH = 56, 16, 58, 46, 520  # margins; narrowest picture
FONT, CHAR = 10, 0.62  # node label size; estimated advance of one character, in em
STROKE = {NodeKind.FEATURE: "#3b6fb6", NodeKind.ERROR: "#8a8a8a", NodeKind.TOKEN: "#2f8f5b",
          NodeKind.LOGIT: "#b5562b"}  # the viewer's colours of the node kinds
_SHOWN = {"\n": "⏎", "\t": "⇥"}


def _valid_xml(ch: str) -> bool:
    o = ord(ch)
    return o in (0x9, 0xA, 0xD) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


def shown(text: str, token: bool = True) -> str:
    """``text`` as drawn: newline as ⏎, tab as ⇥, spaces of a token as ␣, and other control
    characters or those XML cannot hold as their Python escapes (``\\r``, ``\\x01``, ``\\ud800``)."""
    out = []
    for ch in text:
        if ch in _SHOWN:
            out.append(_SHOWN[ch])
        elif ch == " " and token:
            out.append("␣")
        elif not _valid_xml(ch) or unicodedata.category(ch) == "Cc":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _units(ch: str) -> float:
    """Estimated advance of ``ch`` in character cells (wide/emoji 2.2, combining 0)."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0.0
    return 2.2 if unicodedata.east_asian_width(ch) in "WF" or ord(ch) >= 0x1F000 else 1.0


def fit(text: str, px: float, size: float = FONT) -> str:
    """``text`` cut (ending in …) to an estimated width of at most ``px`` at font ``size``."""
    room = px / (CHAR * size)
    if sum(map(_units, text)) <= room:
        return text
    used, out = 1.0, []  # the ellipsis takes one cell
    for ch in text:
        used += _units(ch)
        if used > room:
            break
        out.append(ch)
    return "".join(out) + "…"


def _esc(text: str) -> str:
    return escape(text, {'"': "&quot;"})


def _text(x: float, y: float, text: str, size: float = FONT, anchor: str = "middle", fill: str = "#222",
          title: str = "") -> str:
    """A ``<text>`` element (in a ``<g>`` with a ``<title>`` tooltip when ``title`` is given)."""
    el = (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}" text-anchor="{anchor}" fill="{fill}">'
          f"{_esc(text)}</text>")
    return f"<g><title>{_esc(title)}</title>{el}</g>" if title else el


def _describe(graph: Graph, table, ids, influence, i: int) -> tuple[str, str, str]:
    """(first label line, second label line, tooltip) of node ``i``."""
    kind, layer, pos = NodeKind(int(table.kind[i])), int(table.layer[i]), int(table.pos[i])
    tok = shown(graph.token_strs[pos])
    inf = f", influence {float(influence[i]):.3g}"
    if kind == NodeKind.FEATURE:
        feat, act = int(table.feature[i]), float(table.activation[i])
        return (f"L{layer} #{feat}", f"a={act:.3g}",
                f"feature {ids[i]}: layer {layer}, feature {feat}, position {pos} “{tok}”, "
                f"activation {act:.4g}{inf}")
    if kind == NodeKind.ERROR:
        return (f"error L{layer}", f"@{pos}",
                f"error {ids[i]}: reconstruction error of layer {layer} at position {pos} “{tok}”{inf}")
    if kind == NodeKind.TOKEN:
        return (tok or "“”", f"@{pos}", f"token {ids[i]}: position {pos} “{tok}”, id {int(table.token_id[i])}")
    j = i - graph.logit_start
    label, p = shown(graph.logit_labels[j]), float(graph.logit_probs[j])
    return f"→{label}" if label else "→“”", f"p={p:.3f}", f"logit {ids[i]}: “{label}”, probability {p:.4f}"


def to_svg(graph: Graph, result: Optional[PruneResult] = None, *, max_nodes: int = 60,
           max_edges: int = 200) -> str:
    """The SVG document (a string) of ``graph`` as pruned by ``result`` (default: :func:`prune`
    at its default thresholds), at most ``max_nodes`` nodes and ``max_edges`` edges (see module
    doc)."""
    result = result if result is not None else prune(graph)
    table, ids = graph.nodes(), graph.node_ids()
    (nodes, edges, capped), images = select_blocks(graph, result, max_nodes, max_edges)
    blocks = images.blocks
    n_rows = graph.n_layers + 2  # tokens, layers, logits
    col_of, starts, n_cols = [], {b.first: b for b in blocks}, 0  # position -> column
    for p in range(graph.n_pos):
        inside = [b for b in blocks if b.first < p <= b.last]  # (an image: one column)
        col_of.append(col_of[inside[0].first] if inside else n_cols)
        n_cols += not inside
    cells: dict[tuple[int, int], list[int]] = {}
    for i in nodes:
        cells.setdefault((col_of[int(table.pos[i])], int(table.layer[i]) + 1), []).append(i)
    for cell in cells.values():  # features by index, then errors; tokens and logits in node order
        cell.sort(key=lambda i: (int(table.kind[i]), int(table.feature[i]), i))
    for b in blocks:  # the image's block: -1 - its index, alone in its token cell
        cells[(col_of[b.first], 0)] = [-1 - b.index]

    per_line = [1] * n_cols
    for (p, _), cell in cells.items():
        per_line[p] = max(per_line[p], min(PER_LINE, len(cell)))
    col_w = [k * (W + GAP) + GAP for k in per_line]
    col_x = [ML + sum(col_w[:p]) for p in range(n_cols)]
    lines = [0] * n_rows
    for (p, r), cell in cells.items():
        lines[r] = max(lines[r], math.ceil(len(cell) / per_line[p]))
    row_h = [n * (H + GAP) - GAP + 2 * VPAD if n else EMPTY_ROW for n in lines]
    width = max(ML + sum(col_w) + MR, MIN_WIDTH)
    height = MT + sum(row_h) + MB
    row_y = [height - MB - sum(row_h[:r + 1]) for r in range(n_rows)]  # top of each row

    box: dict[int, tuple[float, float]] = {}  # node -> top-left corner of its box
    for (p, r), cell in cells.items():
        k = per_line[p]
        top = row_y[r] + (row_h[r] - (math.ceil(len(cell) / k) * (H + GAP) - GAP)) / 2
        for j, i in enumerate(cell):
            line, slot = divmod(j, k)
            on_line = min(k, len(cell) - line * k)
            left = col_x[p] + (col_w[p] - (on_line * (W + GAP) - GAP)) / 2
            box[i] = (left + slot * (W + GAP), top + line * (H + GAP))

    title = f"“{shown(graph.prompt, token=False)}”"
    title += f" — {shown(graph.model_name, False)}" if graph.model_name else ""
    sub = (f"{len(nodes) + len(blocks)} nodes, {len(edges) + len(images.edges)} edges"
           + (f" (top {max_nodes} nodes, {max_edges} edges of the pruned graph)" if capped else "")
           + f" · pruned at node/edge thresholds {result.settings.node_threshold:g}/"
           f"{result.settings.edge_threshold:g} · edges: blue positive, red negative, width ∝ |weight|")
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, Menlo, Consolas, monospace">',
           f"<title>{_esc(title)}</title>",
           f'<rect x="0" y="0" width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
           _text(8, 22, fit(title, width - 16, 14), 14, "start", title=title),
           _text(8, 42, fit(sub, width - 16, 10), 10, "start", "#666"), '<g id="grid">']
    for r in range(n_rows):
        name = "Emb" if r == 0 else "Logit" if r == n_rows - 1 else f"L{r - 1}"
        out.append(f'<line x1="{ML}" x2="{width - MR:.0f}" y1="{row_y[r]:.1f}" y2="{row_y[r]:.1f}" stroke="#eeeeee"/>')
        out.append(_text(ML - 8, row_y[r] + row_h[r] / 2 + 3.5, name, 9 if lines[r] == 0 else 10, "end", "#888"))
    for p in range(graph.n_pos):
        c, b = col_of[p], starts.get(p)
        if p and col_of[p - 1] == c:
            continue  # (an image's later positions: its column is drawn at its first)
        out.append(f'<line x1="{col_x[c]:.1f}" x2="{col_x[c]:.1f}" y1="{MT - 6}" y2="{height - MB + 4:.0f}" '
                   'stroke="#f0f0f0"/>')
        if b is not None:
            out.append(_text(col_x[c] + col_w[c] / 2, height - MB + 18, f"{b.first}–{b.last}", 10, fill="#888"))
            out.append(_text(col_x[c] + col_w[c] / 2, height - MB + 34, fit(b.label, col_w[c] - 4, 11), 11,
                             title=f"positions {b.first}–{b.last}: the soft tokens of {b.label} ({b.file})"))
            continue
        tok = shown(graph.token_strs[p])
        out.append(_text(col_x[c] + col_w[c] / 2, height - MB + 18, str(p), 10, fill="#888"))
        out.append(_text(col_x[c] + col_w[c] / 2, height - MB + 34, fit(tok, col_w[c] - 4, 11) or "“”", 11,
                         title=f"position {p}: “{tok}”"))
    out.append('</g>\n<g id="edges" fill="none" stroke-linecap="round">')
    drawn = [(t, s, w, f"{ids[s]} → {ids[t]}: {w:.4g}") for t, s, w in edges]
    drawn += [(t, -1 - k, w, f"{blocks[k].node_id} → {ids[t]}: {w:.4g} (sum of {n} soft-token edges)")
              for t, k, w, n in images.edges]
    drawn.sort(key=lambda e: -abs(e[2]))  # (stable: a text graph's edges keep their order)
    scale = max((abs(w) for _, _, w, _ in drawn), default=1.0) or 1.0
    for t, s, w, tip in reversed(drawn):  # weakest first: the strongest end up on top
        sx, sy = box[s][0] + W / 2, box[s][1]
        tx, ty = box[t][0] + W / 2, box[t][1] + H
        my = (sy + ty) / 2
        out.append(f'<path class="edge" d="M{sx:.1f},{sy:.1f} C{sx:.1f},{my:.1f} {tx:.1f},{my:.1f} {tx:.1f},{ty:.1f}" '
                   f'stroke="{POSITIVE if w >= 0 else NEGATIVE}" stroke-width="{0.3 + 3.7 * abs(w) / scale:.2f}" '
                   f'stroke-opacity="0.6"><title>{_esc(tip)}</title></path>')
    out.append('</g>\n<g id="nodes">')
    for b in blocks:
        x, y = box[-1 - b.index]
        tip = (f"{b.label}: {b.file}, {b.rows}×{b.cols} soft tokens at positions {b.first}–{b.last} "
               "(one block: their edges into a node summed)")
        out.append(f'<g class="node image" data-id="{_esc(b.node_id)}"><title>{_esc(tip)}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{W}" height="{H}" rx="4" fill="{FILL[NodeKind.TOKEN]}" '
                   f'stroke="{STROKE[NodeKind.TOKEN]}" stroke-width="2.4"/>'
                   + _text(x + W / 2, y + 12, fit(b.label, W - 6))
                   + _text(x + W / 2, y + 23, fit(f"{b.rows}×{b.cols} tokens", W - 6), 9, fill="#555") + "</g>")
    for i in nodes:
        kind = NodeKind(int(table.kind[i]))
        first, second, tip = _describe(graph, table, ids, result.influence, i)
        x, y = box[i]
        dash = ' stroke-dasharray="3,2"' if kind == NodeKind.ERROR else ""
        out.append(f'<g class="node {kind.name.lower()}" data-id="{_esc(ids[i])}"><title>{_esc(tip)}</title>'
                   f'<rect x="{x:.1f}" y="{y:.1f}" width="{W}" height="{H}" rx="4" fill="{FILL[kind]}" '
                   f'stroke="{STROKE[kind]}" stroke-width="1.2"{dash}/>'
                   + _text(x + W / 2, y + 12, fit(first, W - 6))
                   + _text(x + W / 2, y + 23, fit(second, W - 6), 9, fill="#555") + "</g>")
    out.append("</g>\n</svg>\n")
    return "\n".join(out)


def write_svg(graph: Graph, path: str | Path, result: Optional[PruneResult] = None, **kwargs) -> Path:
    """Write :func:`to_svg` of ``graph`` to ``path`` atomically (UTF-8); returns ``path``."""
    path = Path(path)
    atomic_write_text(path, to_svg(graph, result, **kwargs))
    return path
