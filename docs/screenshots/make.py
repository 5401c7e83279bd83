"""Regenerate the viewer screenshots of this folder from the committed example graphs.

    PYTHONPATH=python:tests python docs/screenshots/make.py [OUT_DIR]

Serves a temporary copy of graphs/ with ``cltrace serve``'s server (with the real Gemma 3 270M
and the graph's transcoders when they are cached, for the experiment view) and drives the
system Chromium: graph overview, a selected logit with its links, a feature card, a pinned
subgraph with supernodes, an ablation. (big-graph.png and feature-card.png come from
``CLTRACE_SCREENSHOTS=docs/screenshots pytest --full tests/test_serve.py``, and so do the
attention panels' screenshots, on ``support.serve.qk_graph``: flow-heatmap.png (the Flow tab, a
cell's nodes selected), edge-heads.png (a link's split by heads), head-qk.png (a head's pattern
and its QK trace), qk-contributor.png (the card of a contributor only in qk_only_nodes).)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    from playwright.sync_api import sync_playwright

    from cltrace.serve import make_server, serve_in_thread
    from support.serve import cleanup, launch_chromium

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
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
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
