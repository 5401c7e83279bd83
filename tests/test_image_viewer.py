"""The viewer on a graph of an image + text prompt (``cltrace attribute --image``, written by the
real CLI on the tiny random multimodal Gemma 3): the DOT and SVG pictures (an image's soft
tokens as one block), the server's /image/ route, and the image panel
in headless Chromium — the picture drawn, a heatmap over its soft tokens whose cells carry the
graph JSON's own numbers (link weights into the selected node, or the tokens' relevance), a
click on a cell selecting that soft token's embedding node; no JS error, no foreign request.
The oracle is the JSON file read here in Python, independently of the page's script.
"""
from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request

import pytest

from support.image_graphs import image_graph_folder, picture
from support.serve import serving, tiny_setup, watch_page
from support.serve import browser  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, graph dict): the CLI's graph and its PNG copy, plus ``ppm.json``: the same graph
    naming a PPM copy of the picture, ``pruned.json``: without the node of soft token (0, 1),
    ``text.json``: an ordinary text graph; a file outside the folder linked from inside it."""
    root = tmp_path_factory.mktemp("image-viewer")
    folder, path = image_graph_folder(root, extra=["--format", "json,dot,svg"])
    g = json.loads(path.read_text())
    info = g["metadata"]["info"]["images"][0]
    picture(folder / "picture.image1.ppm")
    ppm = json.loads(json.dumps(g))
    ppm["metadata"]["info"]["images"][0]["file"] = "picture.image1.ppm"
    (folder / "ppm.json").write_text(json.dumps(ppm))
    gone = next(n["node_id"] for n in g["nodes"] if n["feature_type"] == "embedding" and n["ctx_idx"] == info["positions"][0] + 1)
    pruned = json.loads(json.dumps(g))
    pruned["nodes"] = [n for n in pruned["nodes"] if n["node_id"] != gone]
    pruned["links"] = [lk for lk in pruned["links"] if gone not in (lk["source"], lk["target"])]
    (folder / "pruned.json").write_text(json.dumps(pruned))
    (folder / "text.json").write_text(json.dumps(tiny_setup()[1]))
    (folder / "notes.ppm").write_text("not an image\n")
    outside = root / "secret.png"
    shutil.copy(folder / info["file"], outside)
    (folder / "escape.png").symlink_to(outside)
    return folder, g


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def test_image_route(served):
    """/image/: browser formats as they are, PPM converted to PNG with the same pixels, nothing
    outside DIR, nothing that is not an image."""
    from PIL import Image

    folder, g = served
    name = g["metadata"]["info"]["images"][0]["file"]
    with serving(folder) as url:
        code, ctype, body = get(f"{url}/image/{name}")
        assert (code, ctype) == (200, "image/png") and body == (folder / name).read_bytes()
        code, ctype, body = get(f"{url}/image/picture.image1.ppm")
        assert (code, ctype) == (200, "image/png") and body[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(body)) as a, Image.open(folder / "picture.image1.ppm") as b:
            assert a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
        assert get(f"{url}/image/notes.ppm")[0] == 415
        for bad in ["picture.json", "graph-metadata.json", "escape.png", "../secret.png", "%2e%2e/secret.png",
                    "/etc/passwd", "nope.png", ""]:
            assert get(f"{url}/image/{bad}")[0] == 404, bad
        assert get(f"{url}/assets/images.js")[0] == 200


def test_dot_and_svg_draw_an_image_as_one_block(served):
    """The .dot and .svg the CLI wrote beside the JSON: no soft token drawn on its own, one
    labelled block for the image whose edge into a node is the sum of the JSON's links from the
    image's soft tokens into it (the same kept edges), the other nodes as usual."""
    import re
    import xml.etree.ElementTree as ET

    folder, g = served
    info = g["metadata"]["info"]["images"][0]
    soft = set(soft_nodes(g).values())
    summed, count = {}, {}
    for lk in g["links"]:
        if lk["source"] in soft:
            summed[lk["target"]] = summed.get(lk["target"], 0.0) + lk["weight"]
            count[lk["target"]] = count.get(lk["target"], 0) + 1
    assert summed
    dot = (folder / "picture.dot").read_text()
    assert not any(f'"{s}"' in dot or f"\t{s} " in dot for s in soft)
    assert re.search(r'image1 \[label="image 1: “picture.image1.png”\n2×2 soft tokens\n@%d–%d"' % tuple(info["positions"]), dot)
    drawn = {m.group(1): (float(m.group(2)), int(m.group(3)))
             for m in re.finditer(r'image1 -> "?([\w-]+)"? \[[^]]*tooltip="([-\d.e+]+) \(sum of (\d+) soft-token edges\)"', dot)}
    assert drawn and set(drawn) <= set(summed)
    for t, (w, n) in drawn.items():
        assert n == count[t] and w == pytest.approx(summed[t], rel=1e-3, abs=1e-6)
    svg = ET.parse(folder / "picture.svg").getroot()
    ns = {"s": "http://www.w3.org/2000/svg"}
    ids = [e.get("data-id") for e in svg.iterfind(".//s:g[@class]", ns) if e.get("class", "").startswith("node")]
    assert "image1" in ids and not soft & set(ids)
    tips = [e.findtext("s:title", namespaces=ns) for e in svg.iterfind(".//s:path[@class='edge']", ns)]
    from_block = {m.group(1): (float(m.group(2)), int(m.group(3))) for m in
                  (re.match(r"image1 → (\S+): ([-\d.e+]+) \(sum of (\d+) soft-token edges\)", t) for t in tips) if m}
    assert from_block == drawn
    labels = [e.text for e in svg.iterfind(".//s:text", ns)]
    assert "image 1" in labels and f"{info['positions'][0]}–{info['positions'][1]}" in labels


# --- the image panel in a real browser ------------------------------------------------------



@pytest.fixture
def page(browser, served):
    with serving(served[0]) as url:
        pg = browser.new_page()
        pg.errors, pg.foreign = watch_page(pg, url)
        pg.url0 = url
        yield pg
        assert pg.errors == [] and pg.foreign == []
        pg.close()


def open_graph(page, path):
    page.goto("about:blank")  # (a new document: not a hash change of the open one)
    page.goto(f"{page.url0}/#graph={path}")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)


def cells(page):
    """{(r, c): (data-v as float or None, fill)} of the first image's heatmap."""
    out = {}
    for e in page.locator('#image-list .icell[data-image="0"]').all():
        v = e.get_attribute("data-v")
        out[int(e.get_attribute("data-r")), int(e.get_attribute("data-c"))] = (float(v) if v else None, e.get_attribute("fill"))
    return out


def soft_nodes(g):
    """{(r, c): embedding node id} of the first image's soft tokens, from metadata.info.images."""
    info = g["metadata"]["info"]["images"][0]
    (rows, cols), first = info["grid"], info["positions"][0]
    emb = {n["ctx_idx"]: n["node_id"] for n in g["nodes"] if n["feature_type"] == "embedding"}
    return {(r, c): emb.get(first + r * cols + c) for r in range(rows) for c in range(cols)}


@pytest.mark.browser
def test_image_panel_heatmap_and_selection(page, served):
    folder, g = served
    open_graph(page, "picture.json")
    assert page.is_visible("#image-pane") and page.evaluate("document.body.dataset.images") == "1"
    page.wait_for_function("document.querySelector('#image-list img').complete")
    size = page.evaluate("[...document.querySelectorAll('#image-list img')].map(i => [i.naturalWidth, i.naturalHeight])")
    from PIL import Image
    with Image.open(folder / g["metadata"]["info"]["images"][0]["file"]) as im:
        assert size == [list(im.size)]
    soft = soft_nodes(g)
    assert set(cells(page)) == set(soft) and len(soft) == 4  # the tiny tower's 2 x 2 grid
    # no selection: each soft token's relevance (row E of the graph's relevance map)
    rel = g["relevance"]
    row = rel["values"][rel["rows"].index("E")]
    first = g["metadata"]["info"]["images"][0]["positions"][0]
    cols = g["metadata"]["info"]["images"][0]["grid"][1]
    assert page.evaluate("document.body.dataset.imageMode") == "influence"
    assert {k: v for k, (v, _) in cells(page).items()} == {(r, c): row[first + r * cols + c] for r, c in soft}
    # a node selected: the weights of its links from the soft tokens, straight from the JSON
    into = {}
    for lk in g["links"]:
        into.setdefault(lk["target"], {})[lk["source"]] = lk["weight"]
    fed = sorted((t for t in into if sum(s in into[t] for s in soft.values()) >= 2),
                 key=lambda t: -sum(s in into[t] for s in soft.values()))
    assert len(fed) >= 2
    fills = []
    for t in fed[:2]:
        page.evaluate(f"window.cltrace.select(window.cltrace.byId.get({json.dumps(t)}))")
        assert page.evaluate("document.body.dataset.imageMode") == "edges"
        got = cells(page)
        assert {k: v for k, (v, _) in got.items()} == {k: into[t].get(s) for k, s in soft.items()}
        fills.append({k: f for k, (_, f) in got.items()})
        big = max(abs(v) for v, _ in got.values() if v is not None)
        assert float(page.evaluate("document.body.dataset.imageMax")) == big
        for v, fill in got.values():  # blue for positive, red for negative, opacity ~ |weight|
            colour, alpha = fill[5:-1].rsplit(",", 1)
            if v is None:
                assert float(alpha) == 0
            else:
                assert colour == ("33, 102, 172" if v >= 0 else "197, 48, 48")
                assert float(alpha) == pytest.approx(0.75 * abs(v) / big, abs=1e-3)
    assert fills[0] != fills[1]
    # a click on a cell selects its soft token's embedding node, outlined in the heatmap
    for (r, c), nid in soft.items():
        page.click(f'#image-list .icell[data-r="{r}"][data-c="{c}"]')
        assert page.evaluate("document.body.dataset.selected") == nid
        assert page.locator("#image-list .icell.on").count() == 1
        assert page.locator("#image-list .icell.on").get_attribute("data-r") == str(r)
        assert page.is_visible("#node-card") and nid in page.inner_text("#node-card")
    page.keyboard.press("Escape")
    assert page.evaluate("document.body.dataset.imageMode") == "influence"


@pytest.mark.browser
def test_image_panel_ppm_pruned_and_text(page, served):
    """A PPM image (converted by the server) is drawn; a cell whose soft token was pruned says so
    and selects nothing; a text graph shows no image panel."""
    folder, g = served
    open_graph(page, "ppm.json")
    page.wait_for_function("document.querySelector('#image-list img').complete")
    assert page.evaluate("document.querySelector('#image-list img').naturalWidth") > 0
    open_graph(page, "pruned.json")
    info = g["metadata"]["info"]["images"][0]
    page.click('#image-list .icell[data-r="0"][data-c="1"]')
    assert page.is_visible("#image-note") and "pruning removed it" in page.inner_text("#image-note")
    assert page.evaluate("document.body.dataset.imageMissing") == str(info["positions"][0] + 1)
    assert page.evaluate("window.cltrace.selected") == -1
    page.click('#image-list .icell[data-r="0"][data-c="0"]')
    assert page.is_hidden("#image-note") and page.evaluate("document.body.dataset.selected") == soft_nodes(g)[0, 0]
    open_graph(page, "text.json")
    assert page.is_hidden("#image-pane") and page.evaluate("document.body.dataset.images") == "0"
    assert page.locator("#image-list .icell").count() == 0


@pytest.mark.browser
def test_ablation_at_an_image_position_from_the_page(browser, served):
    """The viewer's experiment panel on the image graph, served with the multimodal model and
    transcoders loaded from the saved files (as ``cltrace serve --model M --transcoders T``):
    ablating a feature at a soft-token position shows the API's probabilities before and after,
    its continuation, and logit changes equal to what the graph's edges predict."""
    import torch

    from cltrace.models import load_multimodal
    from cltrace.replacement import ReplacementModel
    from cltrace.steering import Intervention, generate, intervene
    from cltrace.transcoders import load_transcoders
    from support.image_graphs import PROMPT

    from cltrace.cli import main

    folder = served[0]
    root = folder.parent
    argv = ["attribute", PROMPT, "--model", str(root / "model"), "--transcoders", str(root / "tcs"),
            "--image", str(root / "picture.png"), "--out", str(folder), "--slug", "wide",
            "--format", "json", "--device", "cpu", "--quiet", "--max-feature-nodes", "1000",
            "--node-threshold", "1", "--edge-threshold", "1"]  # (features at image positions kept)
    assert main(argv) == 0
    g = json.loads((folder / "wide.json").read_text())
    loaded = load_multimodal(root / "model", device="cpu")
    rm = ReplacementModel.from_multimodal(loaded, load_transcoders(root / "tcs"))
    first, last = g["metadata"]["info"]["images"][0]["positions"]
    feat = next(n["node_id"] for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"
                and first <= n["ctx_idx"] <= last)
    with serving(folder, rm=rm) as url:
        pg = browser.new_page()
        errors, foreign = watch_page(pg, url)
        pg.goto(f"{url}/#graph=wide.json")
        pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
        pg.click(f'[data-id="{feat}"]', modifiers=["Shift"])
        pg.locator("#pin-list .pin-check").nth(0).check()
        pg.click("#target-checked")
        pg.select_option("#exp-op", "ablate")
        pg.fill("#exp-tokens", "3")
        pg.click("#exp-run")
        pg.wait_for_function("document.body.dataset.experiment === 'done'", timeout=60000)
        top = [(int(r.get_attribute("data-token")), float(r.get_attribute("data-before")),
                float(r.get_attribute("data-after"))) for r in pg.locator("#exp-top tr[data-token]").all()]
        logit_rows = [(float(r.get_attribute("data-measured")), float(r.get_attribute("data-predicted")))
                      for r in pg.locator("#exp-logits tr[data-node]").all()]
        after_text = pg.inner_text("#cont-after")
        pg.close()
    assert errors == [] and foreign == []
    L, f, p = map(int, feat.split("_"))
    ivs = [Intervention(L, f, pos=p, set=0.0)]
    prompt = loaded.prompt(PROMPT, [str(root / "picture.png")])
    res = intervene(rm, prompt, ivs, mode="frozen", freeze_features=True)
    p0, p1 = torch.softmax(res.clean_logits[-1].double(), -1), torch.softmax(res.logits[-1].double(), -1)
    assert len(top) >= 10
    assert all(b == float(p0[t]) and a == float(p1[t]) for t, b, a in top)
    assert any(b != a for _, b, a in top)
    assert after_text == generate(rm, prompt, ivs, max_new_tokens=3, seed=0).text.strip()
    scale = max(abs(m) for m, _ in logit_rows)
    assert logit_rows and scale > 0
    assert all(abs(m - pr) <= 1e-4 * scale for m, pr in logit_rows)
