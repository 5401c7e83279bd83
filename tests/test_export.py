"""Neuronpedia JSON (schema, determinism, text survival, index), the pure-Python SVG (structure,
escaping, determinism, no Graphviz needed, drawn in a real headless Chromium) and the Graphviz
DOT/PNG/PDF exports.

The browser test and the Graphviz rendering test skip where Chromium/Playwright or ``dot`` are
absent and ``CI=true`` is not set; on CI they fail instead. ``CLTRACE_SCREENSHOTS=DIR`` saves
the browser's screenshot of the SVG there.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

import cltrace

from cltrace.export import (GRAPH_SCHEMA_PATH, render, to_dot, to_neuronpedia, to_svg, write_neuronpedia,
                            write_svg)
from cltrace.export.selection import NEGATIVE, POSITIVE, select
from cltrace.export.svg import fit, shown
from cltrace.graph import Graph, prune
from support.graphs import random_graph
from support.serve import browser  # noqa: F401  (fixture)

NASTY = ['"quoted"', "new\nline", "ünï 😀", "", "tab\t\\"]
# ... and for the SVG: markup, entities, quotes, control characters (C0, DEL, C1), CR, an emoji
# ZWJ sequence, spaces, a lone surrogate (XML can hold none of the controls, even escaped)
SVG_NASTY = ["<bos>", "&amp;", "'\"", "new\nline\r", "\x01\x7f\x9b", "😀👩\u200d👩\u200d👧", "",
             " sp ace", "\ud800", "</svg>]]>"]
SVG = "{http://www.w3.org/2000/svg}"
SHOTS = os.environ.get("CLTRACE_SCREENSHOTS")


def need(why_missing: str) -> None:
    """Skip (fail under ``CI=true``) when a required program is missing."""
    if why_missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot run on CI: {why_missing}")
        pytest.skip(why_missing)


@pytest.fixture
def graph():
    g = random_graph(n_layers=3, n_pos=5, n_features=40, token_strs=NASTY)
    g.prompt = "".join(NASTY)
    g.model_name, g.scan = "tiny-test", "tiny-test-plt"
    g.logit_labels = ['"x"', "\n", "ü"]
    g.settings = {"max_n_logits": 3, "batch_size": 8}
    return g


def test_json_validates_and_is_consistent(graph, tmp_path):
    path = write_neuronpedia(graph, tmp_path, "my-graph")
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(GRAPH_SCHEMA_PATH.read_text()))
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"]), "node ids unique"
    assert all(l["source"] in ids and l["target"] in ids for l in data["links"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == graph.n_logits
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert data["metadata"]["prompt_tokens"] == NASTY and data["metadata"]["prompt"] == graph.prompt
    assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.85}  # the defaults (PruneSettings)
    # Every link is an edge of the graph with its weight.
    dense, node_ids = graph.to_dense(), graph.node_ids()
    for l in data["links"][:50]:
        w = float(dense[node_ids.index(l["target"]), node_ids.index(l["source"])])
        assert l["weight"] == pytest.approx(w)
    errors = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"].split("_")[1] == "-1" for n in errors)


def test_json_follows_the_reference_node_rules(graph, tmp_path):
    """circuit-tracer 0.5.0 (frontend/graph_models.py) and Neuronpedia under schema_version 1:
    a feature's `feature` is the Cantor pairing of (layer, feature index), embeddings carry
    their position, logits their vocabulary id; ids never collide; no machine path or URL."""
    from cltrace.export.neuronpedia import cantor_pair, cantor_unpair

    graph.transcoder_list = ["cltrace-starter/tiny"]
    data = to_neuronpedia(graph, "rules", labels={(int(l), int(f)): f"label {l}/{f}" for l, _, f in graph.features.tolist()})
    assert data["metadata"]["schema_version"] == 1
    assert data["metadata"]["info"]["generator"] == {"name": "cltrace", "version": cltrace.__version__}
    assert data["metadata"]["transcoder_list"] == ["cltrace-starter/tiny"]
    js = [n["jsNodeId"] for n in data["nodes"]]
    assert len(set(js)) == len(js) - sum(  # one jsNodeId per feature across positions
        1 for i, n in enumerate(data["nodes"]) if n["jsNodeId"] in js[:i])
    for n in data["nodes"]:
        kind, parts = n["feature_type"], n["node_id"].split("_")
        if kind == "cross layer transcoder":
            layer, feat, pos = map(int, parts)
            assert n["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
            assert cantor_unpair(n["feature"]) == (layer, feat) and n["layer"] == str(layer)
            assert n["jsNodeId"] == f"{layer}_{feat}-0" and n["ctx_idx"] == pos
            assert n["clerp"] == f"label {layer}/{feat}" and n["activation"] > 0
        elif kind == "mlp reconstruction error":
            assert parts[1] == "-1" and n["feature"] == -1
        elif kind == "embedding":
            assert n["layer"] == "E" and n["feature"] == n["ctx_idx"] == int(parts[2])
            assert n["jsNodeId"] == f"E_{parts[1]}-{parts[2]}"
        else:
            assert n["layer"] == str(graph.n_layers + 1) and n["feature"] == int(parts[1])
            assert n["jsNodeId"] == f"L_{parts[1]}-{parts[2]}" and n["clerp"].startswith("Output ")
    assert [cantor_pair(*cantor_unpair(z)) for z in range(500)] == list(range(500))


def test_json_is_byte_identical_and_index_updates(graph, tmp_path):
    a = write_neuronpedia(graph, tmp_path / "a", "g1").read_bytes()
    b = write_neuronpedia(graph, tmp_path / "b", "g1").read_bytes()
    assert a == b
    write_neuronpedia(graph, tmp_path / "a", "g2", prune(graph, 0.5))
    write_neuronpedia(graph, tmp_path / "a", "g1", prune(graph, 0.6))
    index = json.loads((tmp_path / "a" / "graph-metadata.json").read_text())
    assert [(g["slug"], g["node_threshold"]) for g in index["graphs"]] == [("g1", 0.6), ("g2", 0.5)]
    with pytest.raises(ValueError, match="slug"):
        to_neuronpedia(graph, "a/b")


def test_dot_structure(graph, tmp_path):
    result = prune(graph)
    src = to_dot(graph, result=result).source
    assert "rankdir=BT" in src and "rank=same" in src and '"rank_-1" -> rank_0 [style=invis]' in src
    assert "#2166ac" in src or "#b2182b" in src
    assert "\\n" in src  # multi-line labels
    render(graph, tmp_path / "g.dot", fmt="dot", result=result)
    assert (tmp_path / "g.dot").read_text() == src
    with pytest.raises(ValueError, match="unknown format"):
        render(graph, tmp_path / "g.gif", fmt="gif")


def test_png_and_pdf_rendered_by_graphviz(graph, tmp_path):
    need("" if shutil.which("dot") else "the Graphviz 'dot' program is missing (apt-get install graphviz)")
    result = prune(graph)
    assert render(graph, tmp_path / "g.png", fmt="png", result=result).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render(graph, tmp_path / "g.pdf", fmt="pdf", result=result).read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.pdf", "g.png"]  # no temp files left


def test_dot_is_capped_to_the_most_influential_nodes(graph):
    result = prune(graph, 1.0, 1.0)
    src = to_dot(graph, result=result, max_nodes=graph.n_pos + graph.n_logits + 3).source
    ids = graph.node_ids()
    drawn = [i for i in range(graph.token_start) if f'"{ids[i]}" [' in src or f"{ids[i]} [" in src]
    assert len(drawn) == 3
    best = sorted((i for i in range(graph.token_start) if result.node_mask[i]),
                  key=lambda i: -float(result.influence[i]))[:3]
    assert sorted(drawn) == sorted(best)
    assert "top" in src
    few = to_dot(graph, result=result, max_edges=5).source
    assert few.count("penwidth") == 5


def test_written_files_are_readable_by_others(graph, tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        path = write_neuronpedia(graph, tmp_path, "perm")
        graph.save(tmp_path / "g.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.safetensors").stat().st_mode) == 0o644


# --- SVG (pure Python) -----------------------------------------------------------------------

@pytest.fixture
def svg_graph():
    """A graph with nasty tokens and enough features for crowded cells and a node cap."""
    g = random_graph(n_layers=5, n_pos=len(SVG_NASTY), n_features=300, n_logits=5, seed=2, token_strs=SVG_NASTY)
    g.prompt, g.model_name = "".join(SVG_NASTY), "tiny <&> \"model\""
    g.logit_labels = ["<", "&", "\n", "\x00", "😀"]
    return g


def parse_svg(text: str):
    root = ET.fromstring(text.encode("utf-8"))  # well-formed XML (raises otherwise)
    nodes = [g for g in root.iter(f"{SVG}g") if g.get("class", "").startswith("node ")]
    edges = [p for p in root.iter(f"{SVG}path") if p.get("class") == "edge"]
    return root, nodes, edges


def test_svg_structure_and_escaping(svg_graph, tmp_path):
    result = prune(svg_graph)
    text = to_svg(svg_graph, result)
    root, nodes, edges = parse_svg(text)
    assert root.tag == f"{SVG}svg" and text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    chosen, drawn, capped = select(svg_graph, result, 60, 200)
    ids = svg_graph.node_ids()
    assert capped and len(drawn) == 200 and len(chosen) <= 60
    assert [g.get("data-id") for g in nodes] == [ids[i] for i in chosen]  # one element per drawn node
    assert len(edges) == len(drawn)
    assert sorted(e.get("stroke") for e in edges) == sorted(POSITIVE if w >= 0 else NEGATIVE for *_, w in drawn)
    widths = [float(e.get("stroke-width")) for e in edges]
    assert max(widths) == 4.0 and min(widths) >= 0.3
    assert edges[-1].get("stroke-width") == "4.00"  # the strongest edge is drawn last (on top)
    kinds = [g.get("class") for g in nodes]
    assert kinds.count("node token") == svg_graph.n_pos and kinds.count("node logit") == svg_graph.n_logits
    # Every character of the text is one XML can hold; tokens are shown as the viewer shows them.
    bad = lambda c: ord(c) < 0x20 and c not in "\n\t" or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000  # noqa: E731
    assert not any(map(bad, text))
    tokens = [g for g in nodes if g.get("class") == "node token"]
    for p, g in enumerate(tokens):
        label = g.findall(f"{SVG}text")[0].text or ""
        assert label == (fit(shown(SVG_NASTY[p]), 80 - 6) or "“”")
        assert shown(SVG_NASTY[p]) in g.find(f"{SVG}title").text
    assert [shown(t) for t in SVG_NASTY] == ["<bos>", "&amp;", "'\"", "new⏎line\\r", "\\x01\\x7f\\x9b",
                                              "😀👩\u200d👩\u200d👧", "", "␣sp␣ace", "\\ud800", "</svg>]]>"]
    assert "&lt;/svg&gt;]]&gt;" in text and "&amp;amp;" in text and "</svg>]]>" not in text
    assert root.find(f"{SVG}title").text == f"“{shown(svg_graph.prompt, False)}” — tiny <&> \"model\""
    axis = [t.text for t in root.find(f"{SVG}g[@id='grid']").iter(f"{SVG}text")]
    assert axis[:7] == ["Emb", "L0", "L1", "L2", "L3", "L4", "Logit"] and axis[7:9] == ["0", "<bos>"]
    assert "top 60 nodes, 200 edges" in text and "0.8/0.85" in text
    cap = svg_graph.n_pos + svg_graph.n_logits + 3
    few = parse_svg(to_svg(svg_graph, result, max_nodes=cap, max_edges=7))
    assert [g.get("data-id") for g in few[1]] == [ids[i] for i in select(svg_graph, result, cap, 7).nodes]
    assert len(few[1]) <= cap and len(few[2]) == 7


def test_svg_is_byte_identical(svg_graph, graph, tmp_path):
    a = write_svg(svg_graph, tmp_path / "a.svg").read_bytes()
    assert write_svg(svg_graph, tmp_path / "b.svg", prune(svg_graph)).read_bytes() == a
    assert render(svg_graph, tmp_path / "c.svg").read_bytes() == a  # render's svg is this writer
    graph.save(tmp_path / "g.safetensors")  # (Graph.save cannot store a lone surrogate)
    assert to_svg(Graph.load(tmp_path / "g.safetensors")) == to_svg(graph)


def test_svg_needs_no_graphviz_png_says_what_to_install(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "graphviz", None)  # nor the graphviz Python package
    assert render(graph, tmp_path / "g.svg", fmt="svg").read_text().rstrip().endswith("</svg>")
    assert write_svg(graph, tmp_path / "h.svg").exists()
    monkeypatch.undo()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for fmt in ("png", "pdf"):
        with pytest.raises(RuntimeError, match="apt-get install graphviz"):
            render(graph, tmp_path / f"g.{fmt}", fmt=fmt)
        assert not (tmp_path / f"g.{fmt}").exists()




BOXES = """() => {
  const svg = document.documentElement, box = (e) => { const b = e.getBBox(); return [b.x, b.y, b.width, b.height]; };
  return { tag: svg.tagName, parseErrors: document.getElementsByTagName('parsererror').length,
           width: +svg.getAttribute('width'), height: +svg.getAttribute('height'),
           nodes: [...document.querySelectorAll('g.node')].map((g) => ({ id: g.dataset.id,
             rect: box(g.querySelector('rect')), texts: [...g.querySelectorAll('text')].map(box) })),
           edges: document.querySelectorAll('path.edge').length,
           labels: [...document.querySelectorAll('svg > text, #grid text')].map(box) };
}"""


@pytest.mark.browser
def test_svg_in_a_real_browser(browser, svg_graph, tmp_path):
    """Chromium opens the SVG without errors; every node's box lies inside the picture, no two
    overlap, and each label stays inside its box; axis labels and title stay inside too."""
    result = prune(svg_graph)
    path = write_svg(svg_graph, tmp_path / "g.svg", result)
    chosen, drawn, _ = select(svg_graph, result, 60, 200)
    page, errors = browser.new_page(), []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.goto(path.as_uri())
    got = page.evaluate(BOXES)
    assert got["tag"] == "svg" and got["parseErrors"] == 0 and errors == []
    W, H = got["width"], got["height"]
    page.set_viewport_size({"width": int(W), "height": int(H)})
    assert len(got["nodes"]) == len(chosen) and got["edges"] == len(drawn)
    inside = lambda b, x0, y0, x1, y1, tol=0.5: (b[0] >= x0 - tol and b[1] >= y0 - tol  # noqa: E731
                                                 and b[0] + b[2] <= x1 + tol and b[1] + b[3] <= y1 + tol)
    rects = [n["rect"] for n in got["nodes"]]
    for n in got["nodes"]:
        x, y, w, h = n["rect"]
        assert inside(n["rect"], 0, 0, W, H), n
        assert w > 0 and h > 0 and all(inside(t, x, y, x + w, y + h, 1.0) for t in n["texts"]), n
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert (a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]), (a, b)
    assert all(inside(b, 0, 0, W, H, 1.0) for b in got["labels"])
    shot = tmp_path / "svg.png"
    page.screenshot(path=str(shot))  # (full_page hangs on an SVG document: the viewport is its size)
    assert shot.read_bytes()[:4] == b"\x89PNG"
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(SHOTS) / "export-svg.png")
    page.close()
    assert errors == []
