"""Regenerate the viewer screenshots of this folder from the committed example graphs.

    PYTHONPATH=python:tests python docs/screenshots/make.py [OUT_DIR] [--only main|paris-qk]

``main`` (graph.png, selected-logit.png, selected-feature.png, pinned-supernodes.png,
experiment.png): serves a temporary copy of graphs/*.json with ``cltrace serve``'s server (with
the real Gemma 3 270M and the graph's transcoders when they are cached, for the experiment view)
and drives the system Chromium: graph overview, a selected logit with its links, a feature card,
a pinned subgraph with supernodes, an ablation (experiment.png only when the model is cached).

``paris-qk``: the attention panels on the real graph written with ``--qk``
(graphs/the-capital-of-france-is-paris-qk.json, graphs/ served as it is, feature pages included,
no model; 1500x900, the head 1500x1300): paris-qk-flow.png (the Flow tab, the most relevant cell
of a layer selected, layer 0 at " France": its nodes outlined in the graph and listed),
paris-qk-edge.png (the Edge card of the link from the " France" token to the " Paris" logit, its
weight split by heads: layer 12 head 2 the largest), paris-qk-head.png (the Heads tab on layer 12
head 2, opened from that split: its pattern, the trace query 5 " is" -> key 4 " France", its
pairs and marginals). The run fails on a page error or a failed request.

``lens``: lens.png, the lens page (/lens.html) of ``cltrace lens`` on the real 270M with the
starter transcoders and their cached feature pages (``cltrace attribute`` builds them), the
sentence LENS_TEXT, the cell of layer 12 at " Paris" opened (its top latents and feature card).

``image``: image-graph.png, the image panel on a graph of an image + text prompt: ``cltrace
attribute --image`` on a drawn picture (a red square and a green disc on blue) with the tiny
random multimodal Gemma 3 of tests/support/tiny_gemma_vision.py sized to 224-pixel images and
an 8 x 8 grid of soft tokens (no real multimodal Gemma 3 can be downloaded here), its CLT
calibrated on the prompt (tests/support/image_graphs.py), pruned with ``--node-threshold 0.9
--edge-threshold 0.98`` (more links kept than by default); the node with the most links from
the image's soft tokens selected, the heatmap showing those links' weights.

``lens-image``: lens-image.png, the lens page of ``cltrace lens --image`` on the same drawn
picture and tiny model (224 pixels, 8 x 8 soft tokens) with random resid_post SAEs calibrated on
the prompt (tests/support/lens.py), the image's top latent of the last layer on the heatmap
and the patch where it fires most opened (its cell's latents and feature card).

Without ``--only``: all.

(big-graph.png and feature-card.png come from
``CLTRACE_SCREENSHOTS=docs/screenshots pytest --full tests/test_serve.py``, and so do the
attention panels' screenshots of the small synthetic ``support.serve.qk_graph``:
flow-heatmap.png (the Flow tab, a cell's nodes selected), edge-heads.png (a link's split by heads),
head-qk.png (a head's pattern and its QK trace), qk-contributor.png (the card of a contributor
only in qk_only_nodes).)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QK_GRAPH = "the-capital-of-france-is-paris-qk.json"
LENS_TEXT = "The capital of France is Paris, and the river that runs through it is the Seine."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=Path(__file__).parent, help="where the PNGs go")
    ap.add_argument("--only", choices=("main", "paris-qk", "lens", "image", "lens-image"),
                    help="make only these screenshots")
    a = ap.parse_args()
    if a.only in (None, "main"):
        main_shots(a.out)
    if a.only in (None, "paris-qk"):
        paris_qk_shots(a.out)
    if a.only in (None, "lens"):
        lens_shots(a.out)
    if a.only in (None, "image"):
        image_shots(a.out)
    if a.only in (None, "lens-image"):
        lens_image_shots(a.out)
    print(f"screenshots in {a.out}")
    return 0


def main_shots(out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from cltrace.serve import make_server, serve_in_thread
    from support.serve import cleanup, launch_chromium

    tmp = Path(tempfile.mkdtemp())
    for f in (ROOT / "graphs").glob("*.json"):
        shutil.copy(f, tmp / f.name)
    name = "the-capital-of-france-is.json"
    g = json.loads((tmp / name).read_text())
    rm = None
    tcs = (g["metadata"].get("transcoder_list") or [""])[0]
    if tcs and Path(tcs).is_dir():
        from cltrace.commands._common import load_replacement

        rm = load_replacement(argparse.Namespace(model="gemma-3-270m", transcoders=tcs, device="cpu",
                                                 dtype=None), lambda *a: None)[1]
    srv = make_server(tmp, port=0, rm=rm)
    serve_in_thread(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    logits = sorted((n for n in g["nodes"] if n["feature_type"] == "logit"), key=lambda n: -n["token_prob"])
    feats = sorted((n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"),
                   key=lambda n: n["influence"])
    with sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        pg = ctx.new_page()
        pg.goto(f"{url}/#graph={name}")
        pg.wait_for_function("document.body.dataset.ready === '1'")
        pg.screenshot(path=str(out / "graph.png"))
        pg.click(f'[data-id="{logits[2]["node_id"]}"]')
        pg.screenshot(path=str(out / "selected-logit.png"))
        late = [n for n in feats if int(n["layer"]) > 6]
        pg.click(f'[data-id="{late[0]["node_id"]}"]')
        pg.screenshot(path=str(out / "selected-feature.png"))
        pins = feats[:10] + logits[:3]
        for n in pins:
            pg.click(f'[data-id="{n["node_id"]}"]', modifiers=["Shift"])
        checks = pg.locator("#pin-list .pin-check")
        for group, members in (("early features", range(0, 5)), ("late features", range(5, 10))):
            for i in members:
                checks.nth(i).check()
            pg.fill("#supernode-name", group)
            pg.click("#group-btn")
        pg.check("#pinned-only")
        pg.screenshot(path=str(out / "pinned-supernodes.png"))
        if rm is not None:
            pg.uncheck("#pinned-only")
            pg.select_option("#target-supernode", "1")
            pg.fill("#exp-tokens", "8")
            pg.click("#exp-run")
            pg.wait_for_function("document.body.dataset.experiment === 'done'", timeout=600_000)
            pg.screenshot(path=str(out / "experiment.png"))
        ctx.close()
        cleanup(profile)
    srv.shutdown()
    srv.server_close()
    shutil.rmtree(tmp, ignore_errors=True)


def paris_qk_shots(out: Path) -> None:
    """The Flow tab, an Edge card and the Heads tab on the real --qk graph (see the docstring)."""
    from playwright.sync_api import sync_playwright

    from cltrace.serve import make_server, serve_in_thread
    from support.serve import cleanup, launch_chromium

    root = ROOT / "graphs"
    g = json.loads((root / QK_GRAPH).read_text())
    ids = {n["node_id"] for n in g["nodes"]}
    src = next(i for i in ids if i.startswith("E_") and i.endswith("_4"))  # the " France" token
    tgt = next(n["node_id"] for n in g["nodes"] if n["feature_type"] == "logit" and '" Paris"' in n["clerp"])
    link = next(lk for lk in g["links"] if (lk["source"], lk["target"]) == (src, tgt))
    L, h, _ = max(link["heads"]["one_hop"], key=lambda x: abs(x[2]))
    assert (L, h) == (12, 2), (L, h)  # the largest head of the split, as the docstring says
    trace = next(t for t in g["qk_traces"]
                 if (t["layer"], t["head"], t.get("source"), t.get("target")) == (L, h, src, tgt))
    assert (trace["query_pos"], trace["key_pos"]) == (5, 4)
    rel = g["relevance"]  # the most relevant cell of a layer (row E: a token alone)
    _, row, pos = max((v, r, p) for r, vs in zip(rel["rows"], rel["values"]) if r != "E" for p, v in enumerate(vs))
    srv = make_server(root, port=0)
    serve_in_thread(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        pg = ctx.new_page()
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

        def shot(name, height):
            pg.set_viewport_size({"width": 1500, "height": height})
            pg.mouse.move(5, height - 5)  # (no tooltip over the screenshot)
            pg.screenshot(path=str(out / f"{name}.png"))

        pg.set_viewport_size({"width": 1500, "height": 900})
        pg.goto(f"{url}/#graph={QK_GRAPH}")
        pg.wait_for_function("document.body.dataset.ready === '1'")
        pg.click("#tab-flow")
        pg.click(f'#flow-map .hcell[data-r="{row}"][data-c="{pos}"]')
        assert pg.evaluate("document.body.dataset.cell") == f"{row}:{pos}"
        shot("paris-qk-flow", 900)
        pg.click("#cell-clear")  # (its outline off the next shots)
        pg.click("#tab-node")
        pg.click(f'[data-id="{tgt}"]')
        pg.locator("#links-body .incoming li").filter(has_text=f"({src})").locator(".edge-btn").click()
        assert pg.evaluate("document.body.dataset.edge") == f"{src}>{tgt}"
        pg.evaluate("document.getElementById('edge-card').scrollIntoView({block: 'start'})")
        shot("paris-qk-edge", 900)
        pg.click(f'#edge-body .head-btn[data-layer="{L}"][data-head="{h}"]')
        assert pg.evaluate("document.body.dataset.head") == f"{L}:{h}"
        pg.wait_for_selector("#head-body .trace.active .pairs tr.pair")
        shot("paris-qk-head", 1300)
        ctx.close()
        cleanup(profile)
    srv.shutdown()
    srv.server_close()
    assert not errors, errors


def lens_shots(out: Path) -> None:
    """lens.png: the lens page with a cell opened (see the docstring)."""
    from playwright.sync_api import sync_playwright

    from cltrace.cli import main as cli
    from cltrace.serve import make_server, serve_in_thread
    from support.serve import cleanup, launch_chromium

    tmp = Path(tempfile.mkdtemp())
    assert cli(["lens", LENS_TEXT, "--json", str(tmp / "lens.json"), "--quiet"]) == 0
    data = json.loads((tmp / "lens.json").read_text())
    pos = next(t["pos"] for t in data["tokens"] if t["token"] == " Paris")
    srv = make_server(tmp, port=0)
    serve_in_thread(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    errors = []
    with sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        pg = ctx.new_page()
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("requestfailed", lambda r: errors.append(f"failed: {r.url}"))
        pg.goto(f"{url}/lens.html")
        pg.wait_for_function("document.body.dataset.ready === '1'", timeout=20000)
        pg.locator(f'td.lens-cell[data-layer="12"][data-pos="{pos}"]').click()
        pg.wait_for_selector("#feature-body h3.feature-label")
        pg.wait_for_timeout(300)
        pg.screenshot(path=str(out / "lens.png"))
        ctx.close()
        cleanup(profile)
    srv.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    assert not errors, errors


def image_shots(out: Path) -> None:
    """image-graph.png: the image panel with a node selected (see the docstring)."""
    from playwright.sync_api import sync_playwright

    from support.image_graphs import image_graph_folder
    from support.serve import cleanup, launch_chromium, serving, watch_page

    tmp = Path(tempfile.mkdtemp())
    folder, path = image_graph_folder(tmp, image_size=224, soft_tokens=64,
                                      extra=["--node-threshold", "0.9", "--edge-threshold", "0.98"])
    g = json.loads(path.read_text())
    info = g["metadata"]["info"]["images"][0]
    first, last = info["positions"]
    soft = {n["node_id"] for n in g["nodes"] if n["feature_type"] == "embedding" and first <= n["ctx_idx"] <= last}
    fed: dict[str, int] = {}
    for lk in g["links"]:
        if lk["source"] in soft:
            fed[lk["target"]] = fed.get(lk["target"], 0) + 1
    target = max(fed, key=lambda t: (fed[t], t))
    with serving(folder) as url, sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        pg = ctx.new_page()
        errors, foreign = watch_page(pg, url)
        pg.set_viewport_size({"width": 1500, "height": 900})
        pg.goto(f"{url}/#graph={path.name}")
        pg.wait_for_function("document.body.dataset.ready === '1'")
        pg.wait_for_function("document.querySelector('#image-list img').complete")
        pg.click(f'[data-id="{target}"]')
        pg.mouse.move(5, 895)  # (no tooltip over the screenshot)
        pg.screenshot(path=str(out / "image-graph.png"))
        ctx.close()
        cleanup(profile)
    shutil.rmtree(tmp, ignore_errors=True)
    assert not errors and not foreign, (errors, foreign)



def lens_image_shots(out: Path) -> None:
    """lens-image.png: the lens page of an image + text prompt (see the docstring)."""
    from playwright.sync_api import sync_playwright

    from cltrace.cli import main as cli
    from support.lens import IMAGE_PROMPT, image_lens_setup
    from support.serve import cleanup, launch_chromium, serving, watch_page

    tmp = Path(tempfile.mkdtemp())
    folder, _, image, sets = image_lens_setup(tmp / "setup", image_size=224, soft_tokens=64)
    served = tmp / "served"
    served.mkdir()
    assert cli(["lens", IMAGE_PROMPT, "--model", str(folder), "--dict", sets["resid_post"].source,
                "--image", str(image), "--top-k", "3", "--json", str(served / "picture.json"),
                "--device", "cpu", "--quiet"]) == 0
    data = json.loads((served / "picture.json").read_text())
    e = data["images"][0]
    top = next(x for x in e["layers"] if x["layer"] == max(data["sets"][0]["layers"]))
    best = next(m for m in top["maps"] if m["index"] == top["top"][0])
    k = best["patches"][max(range(len(best["acts"])), key=best["acts"].__getitem__)]
    with serving(served) as url, sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        pg = ctx.new_page()
        errors, foreign = watch_page(pg, url)
        pg.set_viewport_size({"width": 1500, "height": 900})
        pg.goto(f"{url}/lens.html")
        pg.wait_for_function("document.body.dataset.ready === '1'", timeout=20000)
        pg.wait_for_function("document.querySelector('#lens-image-list img').complete")
        pg.click(f'#lens-image-list ul.image-top button[data-latent="{best["index"]}"]')
        pg.click(f'#lens-image-list .icell[data-k="{k}"]')
        pg.wait_for_timeout(300)
        pg.mouse.move(5, 895)  # (no tooltip over the screenshot)
        pg.screenshot(path=str(out / "lens-image.png"))
        ctx.close()
        cleanup(profile)
    shutil.rmtree(tmp, ignore_errors=True)
    assert not errors and not foreign, (errors, foreign)

if __name__ == "__main__":
    sys.exit(main())
