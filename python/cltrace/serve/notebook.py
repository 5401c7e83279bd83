"""``cltrace.serve.show(graph_or_path)``: the viewer inline in a Jupyter notebook.

Builds one self-contained HTML document from the viewer's own assets (style sheet and
scripts inlined, the graph JSON embedded as ``<script type="application/json">``, plus the
feature pages of its features, and of the feature contributors of its QK traces that only
``qk_only_nodes`` describes, when ``metadata.scan`` is a local ``./`` folder next to the graph
file) and shows it in an ``<iframe srcdoc=...>`` so its styles and scripts stay apart from
the notebook's. Read-only: no server, so no saving and no experiments.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Union

from .server import asset
from ..errors import UsageError

MAX_PAGES = 2000  # inlined feature pages at most


def _pages(graph: dict, folder: Path) -> dict:
    scan = str(graph.get("metadata", {}).get("scan", ""))
    if not scan.startswith("./"):
        return {}
    rel = scan[2:]
    rel = rel[len("data/"):] if rel.startswith("data/") else rel  # circuit-tracer's /data/ = the graph folder
    base = (folder / rel).resolve()
    only = graph.get("qk_only_nodes")
    only = list(only.values()) if isinstance(only, dict) else []  # QK contributors not among nodes
    out = {}
    for n in [*graph.get("nodes", []), *only]:
        if not isinstance(n, dict) or n.get("feature") is None:
            continue
        key = str(n.get("feature"))
        if len(out) >= MAX_PAGES or key in out or n.get("feature_type") in ("embedding", "logit", "bias") \
                or "error" in str(n.get("feature_type", "")):
            continue
        f = base / f"{key}.json"
        if f.is_file() and f.resolve().is_relative_to(base):
            out[key] = json.loads(f.read_text())
    return out


def _script(text: str) -> str:
    return text.replace("</", "<\\/")  # no "</script>" inside an inline script


SCRIPTS = ("viewer.js", "panels.js", "heatmap.js", "images.js")  # index.html's, in its order


def page_html(graph: dict, name: str = "graph", pages: Union[dict, None] = None) -> str:
    """The viewer as one HTML document with ``graph`` (and feature ``pages``) inlined."""
    doc = asset("index.html").decode()
    css = asset("viewer.css").decode()
    data = _script(json.dumps({"graph": graph, "pages": pages or {}, "name": name}))
    doc = doc.replace('<link rel="stylesheet" href="/assets/viewer.css">', f"<style>\n{css}\n</style>")
    scripts = "".join(f"<script>\n{_script(asset(n).decode())}\n</script>\n" for n in SCRIPTS)
    tags = "".join(f'<script src="/assets/{n}"></script>\n' for n in SCRIPTS)
    if tags not in doc:
        raise RuntimeError("index.html does not load SCRIPTS in this order: update notebook.SCRIPTS")
    doc = doc.replace(tags,
                      f'<script type="application/json" id="cltrace-inline">{data}</script>\n{scripts}')
    return doc


class Viewer:
    """What :func:`show` returns: Jupyter displays it through ``_repr_html_``."""

    def __init__(self, document: str, height: int = 720):
        self.document = document  # the standalone HTML page (write it to a file to open it)
        self.height = height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.document, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:1px solid #ddd" '
                f'sandbox="allow-scripts"></iframe>')

    def save(self, path) -> Path:
        """Write the standalone page to ``path``."""
        path = Path(path)
        path.write_text(self.document)
        return path


def show(graph_or_path: Union[str, Path, dict], height: int = 720) -> Viewer:
    """Render a graph (a graph JSON dict, or the path of a graph JSON file) inline."""
    if isinstance(graph_or_path, dict):
        graph, name, pages = graph_or_path, graph_or_path.get("metadata", {}).get("slug", "graph"), {}
    else:
        path = Path(graph_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such graph file")
        try:
            graph = json.loads(path.read_text())
        except ValueError as e:
            raise UsageError(f"{path}: not a graph JSON ({e})") from None
        name, pages = path.stem, _pages(graph, path.parent)
    if not isinstance(graph, dict) or "nodes" not in graph:
        raise UsageError("not a graph: expected a JSON object with 'nodes' and 'links'")
    return Viewer(page_html(graph, name, pages), height)
