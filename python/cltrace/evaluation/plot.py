"""SVG picture of an evaluation, drawn in pure Python (no plotting library).

Two panels over the layers (x): above, the FVU (blue) and the fraction of loss recovered
(orange) on one axis from min(0, lowest) to max(1, highest), clipped to [-1, 2] (a value beyond
is an open circle at the edge; its tooltip has the value); below, the mean L0 (green dots)
with a bar from its 10th to its 90th percentile over tokens and a tick at the max. Layers
whose value is not finite are left out of a line. Identical reports give byte-identical output.
"""
from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from ..atomic import atomic_write_text
from .report import EvalReport

WIDTH, PANEL_H, ML, MR, MT, GAP, MB = 640, 200, 60, 130, 40, 60, 40
FVU_COLOUR, RECOVERED_COLOUR, L0_COLOUR = "#3b6fb6", "#d9822b", "#2f8f5b"
CLIP = (-1.0, 2.0)  # the first panel's axis never reaches beyond these


def _esc(text: str) -> str:
    return escape(text, {'"': "&quot;"})


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * step:
            step *= m
            break
    start = math.floor(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        if v >= lo - 1e-9 * step:
            out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    return f"{v:g}"


def to_svg(report: EvalReport) -> str:
    """The SVG document (a string) of ``report``: see the module doc."""
    layers = [e.layer for e in report.layers]
    n = len(layers)
    plot_w = WIDTH - ML - MR
    height = MT + 2 * PANEL_H + GAP + MB

    def x_of(i: int) -> float:
        return ML + (plot_w * (i + 0.5) / n if n else plot_w / 2)

    title = f"{report.set_name or 'transcoders'} on {report.model_name or 'the model'}: {report.tokens} tokens"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">',
           f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
           f'<text x="{WIDTH / 2:.1f}" y="20" font-size="13" text-anchor="middle">'
           f"{_esc(title)}"
           "</text>"]

    def panel(top: float, lo: float, hi: float, label: str):
        hi = hi if hi > lo else lo + 1.0

        def y_of(v: float) -> float:
            return top + PANEL_H * (1 - (v - lo) / (hi - lo))

        out.append(f'<rect x="{ML}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" '
                   'stroke="#999"/>')
        for t in _ticks(lo, hi):
            y = y_of(t)
            out.append(f'<line x1="{ML - 4}" y1="{y:.1f}" x2="{ML + plot_w}" y2="{y:.1f}" '
                       'stroke="#e4e4e4"/>')
            out.append(f'<text x="{ML - 7}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                       f"{_fmt(t)}</text>")
        out.append(f'<text x="14" y="{top + PANEL_H / 2:.1f}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 14 {top + PANEL_H / 2:.1f})">{_esc(label)}</text>')
        step = max(1, math.ceil(n / 24))
        for i, L in enumerate(layers):
            if i % step == 0:
                out.append(f'<text x="{x_of(i):.1f}" y="{top + PANEL_H + 14:.1f}" font-size="10" '
                           f'text-anchor="middle">{L}</text>')
        return y_of

    def line(values: list[float], y_of, colour: str, name: str, legend_y: float, lo: float,
             hi: float) -> None:
        pts = [(x_of(i), y_of(min(max(v, lo), hi)), L, v)
               for i, (L, v) in enumerate(zip(layers, values)) if math.isfinite(v)]
        if len(pts) > 1:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in pts) + '"/>')
        for x, y, L, v in pts:
            fill = colour if lo <= v <= hi else "white"  # open: off the axis, drawn at its edge
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{fill}" stroke="{colour}">'
                       f"<title>{_esc(f'layer {L}: {name} {v:.4g}')}</title></circle>")
        lx = ML + plot_w + 12
        out.append(f'<line x1="{lx}" y1="{legend_y:.1f}" x2="{lx + 18}" y2="{legend_y:.1f}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 24}" y="{legend_y + 4:.1f}" font-size="11">{_esc(name)}</text>')

    # panel 1: FVU and loss recovered
    fvu = [e.fvu for e in report.layers]
    rec = [e.loss_recovered for e in report.layers]
    finite = [v for v in fvu + rec if math.isfinite(v)]
    lo, hi = max(min([0.0, *finite]), CLIP[0]), min(max([1.0, *finite]), CLIP[1])
    top1 = MT
    y1 = panel(top1, lo, hi, "FVU, loss recovered")
    if lo < 0 < hi:
        out.append(f'<line x1="{ML}" y1="{y1(0):.1f}" x2="{ML + plot_w}" y2="{y1(0):.1f}" stroke="#999"/>')
    line(fvu, y1, FVU_COLOUR, "FVU", top1 + 12, lo, hi)
    line(rec, y1, RECOVERED_COLOUR, "loss recovered", top1 + 30, lo, hi)

    # panel 2: L0 (mean, p10-p90 bar, max tick)
    top2 = MT + PANEL_H + GAP
    l0s = [v for e in report.layers for v in (e.l0, e.l0_p10, e.l0_p90, e.l0_max) if math.isfinite(v)]
    y2 = panel(top2, 0.0, max([1.0, *l0s]), "L0 (features per token)")
    for i, e in enumerate(report.layers):
        x = x_of(i)
        if math.isfinite(e.l0_p10) and math.isfinite(e.l0_p90):
            out.append(f'<line x1="{x:.1f}" y1="{y2(e.l0_p10):.1f}" x2="{x:.1f}" y2="{y2(e.l0_p90):.1f}" '
                       f'stroke="{L0_COLOUR}" stroke-width="3" stroke-opacity="0.45"/>')
        if math.isfinite(e.l0_max):
            out.append(f'<line x1="{x - 4:.1f}" y1="{y2(e.l0_max):.1f}" x2="{x + 4:.1f}" '
                       f'y2="{y2(e.l0_max):.1f}" stroke="{L0_COLOUR}"/>')
        if math.isfinite(e.l0):
            tip = (f"layer {e.layer}: L0 mean {e.l0:.3g}, p10 {e.l0_p10:.3g}, p50 {e.l0_p50:.3g}, "
                   f"p90 {e.l0_p90:.3g}, max {e.l0_max:.3g}")
            out.append(f'<circle cx="{x:.1f}" cy="{y2(e.l0):.1f}" r="3" fill="{L0_COLOUR}">'
                       f"<title>{_esc(tip)}</title></circle>")
    lx = ML + plot_w + 12
    out.append(f'<circle cx="{lx + 9}" cy="{top2 + 12}" r="3" fill="{L0_COLOUR}"/>')
    out.append(f'<text x="{lx + 24}" y="{top2 + 16}" font-size="11">L0 mean</text>')
    out.append(f'<line x1="{lx + 9}" y1="{top2 + 24}" x2="{lx + 9}" y2="{top2 + 40}" '
               f'stroke="{L0_COLOUR}" stroke-width="3" stroke-opacity="0.45"/>')
    out.append(f'<text x="{lx + 24}" y="{top2 + 36}" font-size="11">p10-p90</text>')
    out.append(f'<line x1="{lx + 5}" y1="{top2 + 52}" x2="{lx + 13}" y2="{top2 + 52}" stroke="{L0_COLOUR}"/>')
    out.append(f'<text x="{lx + 24}" y="{top2 + 56}" font-size="11">max</text>')
    out.append(f'<text x="{ML + plot_w / 2:.1f}" y="{height - 8}" font-size="11" '
               'text-anchor="middle">layer</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def write_svg(report: EvalReport, path: str | Path) -> Path:
    """Write :func:`to_svg` of ``report`` to ``path`` atomically (UTF-8); returns ``path``."""
    path = Path(path)
    atomic_write_text(path, to_svg(report))
    return path
