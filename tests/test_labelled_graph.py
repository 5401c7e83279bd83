"""A graph that carries feature pages, end to end: pages built by ``cltrace.features`` for the
transcoders of a graph, the graph's JSON labelled with them (``clerp``, ``scan``), and in a
real headless Chromium the viewer (``cltrace serve``) showing a clicked feature's label and
examples, fetched as circuit-tracer's viewer would (``./data/features/{cantor}.json``)."""
from __future__ import annotations

import json
import os
from decimal import ROUND_HALF_UP, Decimal

import pytest

from cltrace.attribution import attribute
from cltrace.export import to_neuronpedia
from cltrace.features import FeaturePages, FeatureSettings, build_pages, pages_for_graph
from cltrace.features.pages import LOGIT_LABEL_MIN_SCORE
from cltrace.graph import prune
from cltrace.replacement import ReplacementModel
from cltrace.serve import make_server, serve_in_thread
from support.serve import browser_missing, cleanup, launch_chromium
from support.tiny_gemma import tiny_model_and_set

BOS, VOCAB, CTX = 2, 300, 24


class Tok:
    """A stand-in tokenizer: token i reads 't{i}'."""

    bos_token_id = BOS

    def batch_decode(self, ids):
        return [f"t{i[0]}" for i in ids]

    def decode(self, ids):
        return "".join(f"t{int(i)}" for i in ids)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(graph folder, graph JSON, pages): a tiny model's graph labelled by its own pages."""
    model, rows, ts = tiny_model_and_set(24, VOCAB, CTX, BOS)
    root = tmp_path_factory.mktemp("labelled")
    build_pages(model, Tok(), ts, rows, [0, 1, 2], root / "pages",
                settings=FeatureSettings(top_k=4, n_samples=4), bar=False)
    pages = FeaturePages(root / "pages")
    rm = ReplacementModel(model, ts)
    graph = attribute(rows[0, :10], rm)
    result = prune(graph, 0.95, 0.99)
    out = root / "graph"
    kept = {(int(l), int(f)) for (l, _, f), keep in zip(graph.features.tolist(), result.node_mask.tolist()) if keep}
    info = pages_for_graph(pages, sorted(kept), out)
    data = to_neuronpedia(graph, "tiny", result=result, labels=info["clerps"], scan=info["scan"])
    (out / "tiny.json").write_text(json.dumps(data))
    return out, data, pages


def test_json_carries_labels_and_a_viewer_scan(labelled):
    out, data, pages = labelled
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats and data["metadata"]["scan"] == "./data/features"
    for n in feats:
        layer, f, _ = map(int, n["node_id"].split("_"))
        assert n["clerp"] == pages.label(layer, f) != ""  # every feature that fired has a label
        page = json.loads((out / "features" / f"{n['feature']}.json").read_text())
        assert page == pages.page(layer, f)
        # the logit half only where the top logit stands out (random decoders: nowhere here)
        shown = page["top_logit_score"] >= LOGIT_LABEL_MIN_SCORE
        assert (" → " in n["clerp"]) == shown and not shown
        assert page["label_examples"] == len(page["examples_quantiles"][0]["examples"]) == pages.label_examples(layer, f)


@pytest.mark.browser
def test_viewer_shows_a_clicked_features_examples(labelled):
    why = browser_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run on CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    out, data, pages = labelled
    node = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, f, _ = map(int, node["node_id"].split("_"))
    page_json = pages.page(layer, f)
    srv = make_server(out, port=0)
    serve_in_thread(srv)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with sync_playwright() as pw:
            ctx, profile = launch_chromium(pw)
            pg = ctx.new_page()
            errors, requests = [], []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("request", lambda r: requests.append(r.url))
            pg.goto(f"{url}/#graph=tiny.json")
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            pg.click(f'[data-id="{node["node_id"]}"]')
            pg.wait_for_selector("#feature-body .example")
            body = pg.inner_text("#feature-body")
            assert node["clerp"] in body
            n_ex = page_json["label_examples"]  # the card says what the label rests on
            assert pg.inner_text("#feature-body .label-basis") == f"label from {n_ex} example{'' if n_ex == 1 else 's'}"
            # JS toFixed(1) of a positive number: the nearest, ties up (Decimal: the exact binary value)
            score = Decimal(page_json["top_logit_score"]).quantize(Decimal("0.1"), ROUND_HALF_UP)
            assert f"{score} SD above the vocabulary mean" in body
            shown = pg.locator("#feature-body .quantile.top .example").count()
            assert shown == len(page_json["examples_quantiles"][0]["examples"]) > 0
            first = pg.locator("#feature-body .quantile.top .example").first.locator("span.tok")
            assert first.all_text_contents() == page_json["examples_quantiles"][0]["examples"][0]["tokens"]
            assert f"/data/features/{node['feature']}.json" in " ".join(requests)
            assert errors == [] and all(r.startswith(url) or r.startswith(("data:", "about:")) for r in requests)
            ctx.close()
            cleanup(profile)
    finally:
        srv.shutdown()
        srv.server_close()
