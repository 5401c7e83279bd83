"""``cltrace serve``: the server's rules (paths, writes, validation) and the viewer in a real
headless Chromium against a real server on a free local port.

The browser tests skip only where Chromium or Playwright is absent and ``CI=true`` is not set;
on CI they fail instead. ``CLTRACE_SCREENSHOTS=DIR`` saves screenshots of the main views.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from cltrace import Intervention, generate, intervene
from cltrace.serve import make_server, serve_in_thread, show
from support.serve import browser  # noqa: F401  (fixture)
from support.serve import (TOKENS, feature_page, qk_graph, serving, synthetic_graph, tiny_setup,
                           watch_page)

SHOTS = os.environ.get("CLTRACE_SCREENSHOTS")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_setup()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny):
    """DIR: the tiny graph (with one feature page), the big synthetic graph, a file outside."""
    root = tmp_path_factory.mktemp("served")
    _, g = tiny
    (root / "tiny.json").write_text(json.dumps(g))
    first = next(n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder")
    (root / "features").mkdir()
    (root / "features" / f"{first['feature']}.json").write_text(json.dumps(feature_page(first["feature"])))
    (root / "big.json").write_text(json.dumps(synthetic_graph()))
    (root / "graph-metadata.json").write_text(json.dumps({"graphs": [
        {"slug": "tiny", "prompt": g["metadata"]["prompt"]}, {"slug": "big", "prompt": ""}]}))
    outside = root.parent / f"{root.name}-secret.txt"
    outside.write_text("secret")
    (root / "escape.txt").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def server(folder, tiny):
    srv = make_server(folder, port=0, rm=tiny[0])
    serve_in_thread(srv)
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def http(url, data=None, method=None):
    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --- the server's rules ------------------------------------------------------------------

def test_serves_only_files_inside_dir(server):
    assert http(f"{server}/data/tiny.json")[0] == 200
    assert http(f"{server}/data/features/")[0] == 404  # folders are not listed
    for bad in ["/data/../README.md", "/data/%2e%2e/x", "/data/features/../../etc/passwd",
                "/data//etc/passwd", "/data/%2Fetc%2Fpasswd", "/data/escape.txt", "/etc/passwd",
                "/assets/../server.py", "/assets/index.html"]:
        assert http(server + bad)[0] == 404, bad
    for method in ("PUT", "DELETE", "PATCH"):
        assert http(f"{server}/data/tiny.json", {"x": 1}, method=method)[0] == 405
    assert http(f"{server}/data/tiny.json", {"x": 1}, method="POST")[0] == 405
    listed = json.loads(http(f"{server}/api/graphs")[1])["graphs"]
    assert [g["path"] for g in listed] == ["tiny.json", "big.json"]


def test_refuses_other_sites(server):
    """DNS rebinding (a foreign Host), cross-origin and non-JSON writes get 403."""
    import http.client

    port = int(server.rsplit(":", 1)[1])

    def ask(method, path, headers, body=None):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        out = r.status, r.read()
        c.close()
        return out

    assert ask("GET", "/api/graphs", {"Host": "evil.example:80"})[0] == 403
    save = json.dumps({"graph": "tiny.json", "qParams": {}})
    assert ask("POST", "/api/save", {"Host": f"127.0.0.1:{port}", "Content-Type": "text/plain"}, save)[0] == 403
    assert ask("POST", "/api/save", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json",
                                     "Origin": "http://evil.example"}, save)[0] == 403
    assert ask("GET", "/api/graphs", {"Host": f"localhost:{port}"})[0] == 200


def test_save_is_validated_and_atomic(server, folder):
    before = json.loads((folder / "tiny.json").read_text())
    code, body = http(f"{server}/api/save", {"graph": "tiny.json", "qParams": {"pinnedIds": ["nope_1_2"]}}, "POST")
    assert code == 400 and b"unknown node ids" in body
    assert http(f"{server}/api/save", {"graph": "../x.json", "qParams": {}}, "POST")[0] == 404
    assert http(f"{server}/api/save", {"graph": "tiny.json", "qParams": {"supernodes": [["only-a-name"]]}}, "POST")[0] == 400
    assert json.loads((folder / "tiny.json").read_text()) == before  # refused: untouched
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_intervention_requests_are_validated(server, tiny):
    feat = next(n for n in tiny[1]["nodes"] if n["feature_type"] == "cross layer transcoder")
    L, f, p = map(int, feat["node_id"].split("_"))
    good = {"layer": L, "feature": f, "pos": p, "op": "set", "value": 0}
    cases = [({"layer": 9}, "layer 9 is out of range [0, 4)"), ({"feature": 48}, "out of range [0, 48)"),
             ({"pos": 8}, "position 8 is out of range [0, 8)"), ({"op": "mul"}, "op must be one of"),
             ({"value": "x"}, "must be a finite number"), ({"pos": 0}, "no features")]
    for change, message in cases:
        code, body = http(f"{server}/api/intervene", {"graph": "tiny.json", "interventions": [{**good, **change}]}, "POST")
        assert code == 400 and message in json.loads(body)["error"], (change, body)
    code, body = http(f"{server}/api/intervene", {"graph": "big.json", "interventions": [good]}, "POST")
    assert code == 400 and "computed for a 18-layer model" in json.loads(body)["error"]
    assert http(f"{server}/api/intervene", {"graph": "nope.json", "interventions": [good]}, "POST")[0] == 404


def test_cltrace_serve_command(folder):
    """The command itself, in a subprocess on a free port: no model, so no experiments."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "cltrace.cli", "serve", str(folder), "--port", "0"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("cltrace serve: http://localhost:"), line
        url = line.split()[2].rstrip("/").replace("localhost", "127.0.0.1")
        code, body = http(f"{url}/")
        assert code == 200 and b'<script src="/assets/viewer.js">' in body
        assert json.loads(http(f"{url}/api/model")[1]) == {"available": False}
        code, body = http(f"{url}/api/intervene", {"graph": "tiny.json", "interventions": []}, "POST")
        assert code == 409 and b"--model" in body
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- the viewer in a real browser ----------------------------------------------------------



def recording_page(browser, server):
    """A fresh tab that records JS errors and every request that leaves 127.0.0.1:port; checks
    there were none when the test is done."""
    pg = browser.new_page()
    pg.errors, pg.foreign = watch_page(pg, server)
    yield pg
    assert pg.errors == [] and pg.foreign == []
    pg.close()


@pytest.fixture
def page(browser, server):
    yield from recording_page(browser, server)


def set_threshold(page, value):
    page.evaluate(f"""() => {{ const s = document.getElementById('threshold');
        s.value = {value}; s.dispatchEvent(new Event('input')); }}""")


def reset(folder, graph):
    (folder / "tiny.json").write_text(json.dumps(graph))


def open_graph(page, server, path):
    page.goto(f"{server}/#graph={path}")
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)


def shot(page, name):
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=False)


@pytest.mark.browser
def test_page_draws_every_node_and_selects(page, server, tiny):
    g = tiny[1]
    open_graph(page, server, "tiny.json")
    assert page.locator("#graph .node").count() == len(g["nodes"])
    assert int(page.evaluate("document.body.dataset.nodesShown")) == len(g["nodes"])
    assert page.locator("#graph .toklabel").all_text_contents() == g["metadata"]["prompt_tokens"]
    logit = next(n for n in g["nodes"] if n["feature_type"] == "logit")
    page.hover(f'[data-id="{logit["node_id"]}"]')
    assert logit["node_id"] in page.inner_text("#tooltip")
    page.click(f'[data-id="{logit["node_id"]}"]')
    incoming = sum(1 for link in g["links"] if link["target"] == logit["node_id"])
    assert page.locator("#links-body .linklist.incoming li").count() == incoming
    assert int(page.evaluate("document.body.dataset.linksDrawn")) == incoming
    shown = [float(x) for x in page.locator("#links-body .incoming .w").all_text_contents()]
    assert shown == sorted(shown, key=abs, reverse=True)
    assert page.is_hidden("#tabs") and page.locator("#links-body .edge-btn").count() == 0  # (no attention fields)
    set_threshold(page, 0.3)  # pruning slider: features with influence <= 0.3 stay
    kept = sum(1 for n in g["nodes"] if n["feature_type"] in ("embedding", "logit") or n["influence"] <= 0.3)
    assert int(page.evaluate("document.body.dataset.nodesShown")) == kept < len(g["nodes"])
    page.fill("#search", "E_201_2")
    assert page.locator("#search-list li").count() == 1
    page.press("#search", "Enter")
    assert page.evaluate("document.body.dataset.selected") == "E_201_2"


@pytest.mark.browser
def test_committed_graphs_open(browser, tmp_path):
    """Every graph the writer produced (graphs/*.json) opens with all its nodes drawn."""
    root = Path(__file__).resolve().parents[1] / "graphs"
    srv = make_server(root, port=0)
    serve_in_thread(srv)
    errors, opened = [], 0
    try:
        for f in sorted(root.glob("*.json")):
            if f.name == "graph-metadata.json":
                continue
            g = json.loads(f.read_text())
            pg = browser.new_page()
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(f"http://127.0.0.1:{srv.server_address[1]}/#graph={f.name}")
            pg.wait_for_function("document.body.dataset.ready === '1'")
            assert pg.locator("#graph .node").count() == len(g["nodes"]), f.name
            assert int(pg.evaluate("document.body.dataset.nodesShown")) == len(g["nodes"]), f.name
            pg.close()
            opened += 1
    finally:
        srv.shutdown()
        srv.server_close()
    assert errors == [] and opened >= 1


@pytest.mark.browser
def test_feature_card_with_and_without_page(page, server, tiny):
    feats = [n for n in tiny[1]["nodes"] if n["feature_type"] == "cross layer transcoder"]
    open_graph(page, server, "tiny.json")
    page.click(f'[data-id="{feats[0]["node_id"]}"]')
    page.wait_for_selector("#feature-body .example")
    assert page.locator("#feature-body .quantile.top .example").count() == 2
    toks = page.locator("#feature-body .quantile.top .example").first.locator("span.tok")
    assert toks.all_text_contents() == ["The", " capital", " of", " France"]
    assert toks.nth(3).get_attribute("style") == "background: rgb(242, 140, 40);"  # act 4.0 = act_max
    assert toks.nth(0).get_attribute("style") is None  # act 0: unshaded
    assert page.locator("#feature-body .top-logits li").all_text_contents() == ["␣Paris", "␣Lyon", "␣France"]
    assert page.locator("#feature-body .hist rect").count() == 6
    assert "1.230 %" in page.inner_text("#feature-body")
    L, f, _ = feats[0]["node_id"].split("_")
    assert f"layer {L}, feature {f}" in page.inner_text("#feature-body")
    shot(page, "feature-card")
    page.click(f'[data-id="{feats[1]["node_id"]}"]')
    page.wait_for_selector("#feature-body .nopage")


@pytest.mark.browser
def test_pin_group_save_reload(page, server, folder, tiny):
    a, b = [n["node_id"] for n in tiny[1]["nodes"] if n["feature_type"] == "cross layer transcoder"][:2]
    reset(folder, tiny[1])
    open_graph(page, server, "tiny.json")
    page.click(f'[data-id="{a}"]')
    page.click("#pin-btn")
    page.click(f'[data-id="{b}"]', modifiers=["Shift"])
    assert page.locator("#pin-list .pin-check").count() == 2
    page.locator("#pin-list .pin-check").nth(0).check()
    page.locator("#pin-list .pin-check").nth(1).check()
    page.fill("#supernode-name", "capital")
    page.click("#group-btn")
    page.check("#pinned-only")
    assert int(page.evaluate("document.body.dataset.nodesShown")) == 2
    shot(page, "pinned-subgraph")
    page.click("#save-btn")
    page.wait_for_function("document.getElementById('save-status').textContent.startsWith('saved')")
    q = json.loads((folder / "tiny.json").read_text())["qParams"]
    assert q["pinnedIds"] == [a, b] and q["supernodes"] == [["capital", a, b]]
    assert q["linkType"] == "both"  # other qParams kept
    open_graph(page, server, "tiny.json")
    assert page.locator("#supernode-list .supernode").all_text_contents()[0].startswith("capital")
    assert page.locator("#graph .node.pinned").count() == 2


@pytest.mark.browser
def test_ablation_from_page_matches_api(page, server, folder, tiny):
    rm, g = tiny
    feats = [n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"]
    ids = [feats[0]["node_id"], feats[3]["node_id"]]
    reset(folder, g)
    open_graph(page, server, "tiny.json")
    for nid in ids:
        page.click(f'[data-id="{nid}"]', modifiers=["Shift"])
    page.locator("#pin-list .pin-check").nth(0).check()
    page.locator("#pin-list .pin-check").nth(1).check()
    page.click("#target-checked")
    page.select_option("#exp-op", "ablate")
    page.fill("#exp-tokens", "4")
    page.click("#exp-run")
    page.wait_for_function("document.body.dataset.experiment === 'done'", timeout=60000)
    shot(page, "experiment")
    ivs = [Intervention(*map(int, nid.split("_")[:2]), pos=int(nid.split("_")[2]), set=0.0) for nid in ids]
    res = intervene(rm, TOKENS, ivs, mode="frozen", freeze_features=True)
    p0, p1 = torch.softmax(res.clean_logits[-1].double(), -1), torch.softmax(res.logits[-1].double(), -1)
    rows = page.locator("#exp-top tr[data-token]")
    assert rows.count() >= 10
    for i in range(rows.count()):
        r = rows.nth(i)
        t = int(r.get_attribute("data-token"))
        assert float(r.get_attribute("data-before")) == float(p0[t])
        assert float(r.get_attribute("data-after")) == float(p1[t])
    assert any(float(p0[t]) != float(p1[t]) for t in range(p0.numel()))
    gen = generate(rm, TOKENS, ivs, max_new_tokens=4, seed=0)
    assert page.inner_text("#cont-after") == " ".join(f"#{t}" for t in gen.new_tokens.tolist())
    for r in page.locator("#exp-logits tr[data-node]").all():  # edges predict the frozen change
        measured, predicted = float(r.get_attribute("data-measured")), float(r.get_attribute("data-predicted"))
        if "pruned" in r.inner_text():
            continue
        # attribution (attribute()) against intervention: float32 rounding only (measured: at most
        # 2.2e-7 apart, 6.8e-5 relative at |Δ| ~ 1e-3, over every single-feature ablation, all but
        # one at once, and scale/add; was rel 1e-3 when both sides were intervene())
        assert predicted == pytest.approx(measured, rel=1e-4, abs=1e-6)
    assert "link pruned from JSON" in page.inner_text("#exp-logits")


@pytest.mark.browser
def test_invalid_experiments_show_clear_errors(page, server, tiny):
    err = next(n for n in tiny[1]["nodes"] if n["feature_type"] == "mlp reconstruction error")
    open_graph(page, server, "tiny.json")
    page.click(f'[data-id="{err["node_id"]}"]')
    page.click("#target-selected")
    page.click("#exp-run")
    page.wait_for_selector("#exp-error:not([hidden])")
    assert "only features can be intervened on" in page.inner_text("#exp-error")
    feat = next(n for n in tiny[1]["nodes"] if n["feature_type"] == "cross layer transcoder")
    page.click(f'[data-id="{feat["node_id"]}"]')
    page.click("#target-selected")
    page.fill("#exp-tokens", "999")
    page.click("#exp-run")
    page.wait_for_function("document.body.dataset.experiment === 'error'")
    assert "max_new_tokens 999 is out of range" in page.inner_text("#exp-error")


@pytest.mark.browser
def test_big_graph_opens_and_stays_usable(page, server, folder):
    """The big graph opens with every node drawn; selecting its busiest node and moving the
    pruning slider work, under the density cap. (How long they take is measured by
    benchmarks/end_to_end/bench_viewer.py, not here: a wall-clock limit in a test fails from
    machine load alone.)"""
    g = json.loads((folder / "big.json").read_text())
    open_graph(page, server, "big.json")
    print(f"big graph ({len(g['nodes'])} nodes, {len(g['links'])} links): opened in "
          f"{page.evaluate('window.cltraceOpenMs'):.0f} ms in the page (informative only)")
    assert page.locator("#graph .node").count() == len(g["nodes"])
    assert int(page.evaluate("document.body.dataset.nodesShown")) == len(g["nodes"])
    busiest = max(g["nodes"], key=lambda n: sum(1 for link in g["links"] if n["node_id"] in (link["source"], link["target"]))
                  if n["feature_type"] == "logit" else 0)
    page.evaluate(f"""() => window.cltrace.select(window.cltrace.byId.get({json.dumps(busiest["node_id"])}))""")
    assert page.evaluate("document.body.dataset.selected") == busiest["node_id"]
    set_threshold(page, 0.4)  # pruning slider: features with influence <= 0.4 stay
    kept = sum(1 for n in g["nodes"] if n["feature_type"] in ("embedding", "logit") or n["influence"] <= 0.4)
    assert int(page.evaluate("document.body.dataset.nodesShown")) == kept < len(g["nodes"])
    assert 0 < int(page.evaluate("document.body.dataset.linksDrawn")) <= 300  # density cap
    shot(page, "big-graph")


@pytest.mark.browser
def test_notebook_show_renders_inline(browser, folder, tiny):
    viewer = show(folder / "tiny.json")
    assert viewer._repr_html_().startswith("<iframe srcdoc=")
    pg = browser.new_page()
    errors, requests = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: requests.append(r.url))
    pg.set_content(viewer.document)
    pg.wait_for_function("document.body.dataset.ready === '1'")
    assert pg.locator("#graph .node").count() == len(tiny[1]["nodes"])
    first = next(n for n in tiny[1]["nodes"] if n["feature_type"] == "cross layer transcoder")
    pg.click(f'[data-id="{first["node_id"]}"]')
    pg.wait_for_selector("#feature-body .example")  # the feature page was inlined
    pg.set_content(viewer._repr_html_())  # as Jupyter shows it: in a sandboxed iframe
    frame = pg.frames[1]
    frame.wait_for_function("document.body.dataset.ready === '1'")
    assert frame.locator("#graph .node").count() == len(tiny[1]["nodes"])
    assert errors == [] and [u for u in requests if not u.startswith(("data:", "about:"))] == []
    pg.close()


# --- the attention panels: Flow heatmap, edge → heads, head pattern and QK traces --------------

@pytest.fixture(scope="module")
def qk_folder(tmp_path_factory):
    """(DIR, graph): qk.json (support.serve.qk_graph: every attention field), with the feature
    pages of one graph feature and of the qk-only feature, flow.json (the same graph with
    `relevance` only) and old.json (head_patterns without `queries`, as written before it: every
    row; the head with some rows only left out)."""
    root = tmp_path_factory.mktemp("qk")
    g = qk_graph()
    (root / "qk.json").write_text(json.dumps(g))
    flow_only = {k: v for k, v in g.items() if k not in ("qk_traces", "qk_only_nodes", "head_patterns")}
    flow_only["links"] = [{k: v for k, v in link.items() if k != "heads"} for link in g["links"]]
    (root / "flow.json").write_text(json.dumps(flow_only))
    old = dict(g, head_patterns=[{k: v for k, v in p.items() if k != "queries"}  # before `queries`:
                                 for p in g["head_patterns"] if len(p["queries"]) == len(p["pattern"][0])])  # all rows
    (root / "old.json").write_text(json.dumps(old))
    (root / "features").mkdir()
    nodes = {n["node_id"]: n for n in g["nodes"]} | g["qk_only_nodes"]
    for nid in ("0_12_2", g["metadata"]["qk"]["qk_only"]):
        c = nodes[nid]["feature"]
        (root / "features" / f"{c}.json").write_text(json.dumps(feature_page(c)))
    return root, g


@pytest.fixture(scope="module")
def qk(qk_folder):
    """A server (no model) over qk_folder."""
    root, g = qk_folder
    with serving(root) as url:
        yield g, url


@pytest.fixture
def qk_page(browser, qk):
    yield from recording_page(browser, qk[1])


def ids_of(page, selector, attr="data-id"):
    return {e.get_attribute(attr) for e in page.locator(selector).all()}


@pytest.mark.browser
def test_flow_heatmap_selects_a_cells_nodes(qk_page, qk):
    """Flow tab: a (layers + 1) × positions heatmap of `relevance`, rows as on the grid (the last
    layer on top, E at the bottom); a click selects exactly the nodes of that layer and position."""
    page, (g, url) = qk_page, qk
    rel, n_pos = g["relevance"], len(g["metadata"]["prompt_tokens"])
    open_graph(page, url, "qk.json")
    page.click("#tab-flow")
    cells = page.locator("#flow-map .hcell")
    assert cells.count() == len(rel["rows"]) * n_pos == 4 * 6
    rows_drawn = [cells.nth(i * n_pos).get_attribute("data-r") for i in range(len(rel["rows"]))]
    assert rows_drawn == list(reversed(rel["rows"]))  # top: the last layer; bottom: the tokens
    for i in range(cells.count()):
        c = cells.nth(i)
        r, p = c.get_attribute("data-r"), int(c.get_attribute("data-c"))
        assert float(c.get_attribute("data-v")) == rel["values"][rel["rows"].index(r)][p]
    labels = page.locator("#flow-map text").all_text_contents()
    assert labels[:4] == ["L2", "L1", "L0", "E"] and "␣capital" in labels
    page.hover('#flow-map .hcell[data-r="1"][data-c="5"]')
    assert f"relevance {rel['values'][2][5]:.4f}" in page.inner_text("#tooltip")

    def cell(r, p):
        return {n["node_id"] for n in g["nodes"] if n["layer"] == r and n["ctx_idx"] == p}

    for r, p in [("0", 4), ("E", 2), ("1", 5), ("2", 0)]:
        page.click(f'#flow-map .hcell[data-r="{r}"][data-c="{p}"]')
        assert int(page.evaluate("document.body.dataset.cellSelected")) == len(cell(r, p))
        assert ids_of(page, "#graph .node.incell") == cell(r, p)
        assert page.locator("#cell-list li").count() == len(cell(r, p))
    assert cell("0", 4) == {"0_30_4", "0_31_4"} and cell("1", 5) == {"1_21_5", "1_-1_5"} and not cell("2", 0)
    page.click('#flow-map .hcell[data-r="0"][data-c="4"]')
    assert page.locator("#graph .cellmark").count() == 1
    page.mouse.move(5, 890)  # (no tooltip over the screenshot)
    shot(page, "flow-heatmap")
    page.click('#flow-map .hcell[data-r="0"][data-c="4"]')  # the same cell again: cleared
    assert page.evaluate("document.body.dataset.cellSelected") == "0"
    assert page.locator("#graph .node.incell").count() == 0 and page.locator("#graph .cellmark").count() == 0
    page.click('#flow-map .hcell[data-r="E"][data-c="4"]')
    page.click("#cell-clear")  # or its clear button
    assert page.evaluate("document.body.dataset.cellSelected") == "0" and page.is_hidden("#cell-card")
    page.click('#flow-map .hcell[data-r="0"][data-c="2"]')
    page.click("#cell-list button")  # a listed node: selected, its card shown
    assert page.evaluate("document.body.dataset.selected") == "0_12_2"
    assert page.evaluate("document.body.dataset.tab") == "node" and page.is_visible("#node-card")


@pytest.mark.browser
def test_graph_with_relevance_only(qk_page, qk):
    """A graph with `relevance` but no attention fields: the Flow tab and no Heads tab, no
    clickable weights."""
    page, (g, url) = qk_page, qk
    open_graph(page, url, "flow.json")
    assert page.is_visible("#tab-flow") and page.is_hidden("#tab-heads")
    page.click('[data-id="2_40_5"]')
    assert page.locator("#links-body li").count() > 0 and page.locator("#links-body .edge-btn").count() == 0
    page.click("#tab-flow")
    assert page.locator("#flow-map .hcell").count() == 24


@pytest.mark.browser
def test_edge_heads_split_sums_to_weight(qk_page, qk):
    """A link's weight clicked in the links list: its split by heads, the parts summing to it."""
    page, (g, url) = qk_page, qk
    src, tgt = g["metadata"]["qk"]["edge"]
    link = next(lk for lk in g["links"] if (lk["source"], lk["target"]) == (src, tgt))
    h = link["heads"]
    open_graph(page, url, "qk.json")
    page.click(f'[data-id="{tgt}"]')
    assert page.locator("#links-body .edge-btn").count() == sum(1 for lk in g["links"] if tgt in (lk["source"], lk["target"]))
    page.locator("#links-body .incoming li").filter(has_text=f"({src})").locator(".edge-btn").click()
    assert page.evaluate("document.body.dataset.edge") == f"{src}>{tgt}"
    parts = page.locator("#edge-body tr.part")
    want = [h["residual"], *[w for _, _, w in h["one_hop"]], h["other_one_hop"], h["multi_hop"]]
    assert [float(parts.nth(i).get_attribute("data-v")) for i in range(parts.count())] == want
    assert sum(want) == pytest.approx(link["weight"], abs=1e-9)
    assert float(page.evaluate("document.body.dataset.edgeSum")) == pytest.approx(link["weight"], abs=1e-9)
    assert float(page.evaluate("document.body.dataset.edgeWeight")) == link["weight"]
    assert page.locator("#edge-body .sum:not(.bad)").count() == 1
    heads = page.locator("#edge-body .head-btn")
    assert [(int(b.get_attribute("data-layer")), int(b.get_attribute("data-head"))) for b in heads.all()] == \
        [(L, hd) for L, hd, _ in h["one_hop"]]
    assert "traced" in heads.first.inner_text()  # (layer 1, head 0) has a QK trace for this edge
    assert page.locator("#graph .edgemark").count() == 1
    shot(page, "edge-heads")
    page.click(f'[data-id="{src}"]')  # one of the edge's ends: the edge stays
    assert page.is_visible("#edge-card")
    page.click('[data-id="E_818_1"]')  # another node: it goes
    assert page.is_hidden("#edge-card") and page.locator("#graph .edgemark").count() == 0


@pytest.mark.browser
def test_head_pattern_traces_and_contributors(qk_page, qk):
    """A head from an edge's split: its pattern (query × key, the traced cell outlined), its trace
    with every pair and marginal; a pair's sides select their node or show the qk-only card."""
    page, (g, url) = qk_page, qk
    src, tgt = g["metadata"]["qk"]["edge"]
    n_pos = len(g["metadata"]["prompt_tokens"])
    t = g["qk_traces"][0]
    pattern = next(p["pattern"] for p in g["head_patterns"] if (p["layer"], p["head"]) == (t["layer"], t["head"]))
    open_graph(page, url, "qk.json")
    page.click(f'[data-id="{tgt}"]')
    page.locator("#links-body .incoming li").filter(has_text=f"({src})").locator(".edge-btn").click()
    page.click(f'#edge-body .head-btn[data-layer="{t["layer"]}"][data-head="{t["head"]}"]')
    assert page.evaluate("document.body.dataset.tab") == "heads"
    assert page.evaluate("document.body.dataset.head") == f"{t['layer']}:{t['head']}"
    cells = page.locator("#head-body svg.pattern .hcell")
    assert cells.count() == n_pos * n_pos
    for i in range(cells.count()):
        c = cells.nth(i)
        assert float(c.get_attribute("data-v")) == pattern[int(c.get_attribute("data-r"))][int(c.get_attribute("data-c"))]
    active = page.locator("#head-body .tracecell.active")
    assert (active.get_attribute("data-r"), active.get_attribute("data-c")) == (str(t["query_pos"]), str(t["key_pos"]))
    assert page.locator(f'#head-body .edgecell[data-r="{t["query_pos"]}"][data-c="{t["key_pos"]}"]').count() == 1
    traces = [x for x in g["qk_traces"] if (x["layer"], x["head"]) == (t["layer"], t["head"])]
    assert page.locator("#head-body .trace").count() == len(traces) == 1
    block = page.locator("#head-body .trace.active")
    assert f"{t['score']:.4f}" in block.inner_text() and f"{t['prob']:.4f}" in block.inner_text()
    assert block.locator(".pairs tr.pair").count() == len(t["pair_wise_contributors"])
    assert [float(r.get_attribute("data-attr")) for r in block.locator(".pairs tr.pair").all()] == \
        [a for _, _, a in t["pair_wise_contributors"]]
    assert block.locator(".qmarg tr.marg-row").count() == len(t["top_q_marginal_contributors"])
    assert block.locator(".kmarg tr.marg-row").count() == len(t["top_k_marginal_contributors"])
    shot(page, "head-qk")
    q_id, k_id, _ = t["pair_wise_contributors"][0]  # both in the graph
    block.locator(f'.pairs tr.pair >> nth=0 >> button.side[data-node="{q_id}"]').click()
    assert page.evaluate("document.body.dataset.selected") == q_id  # selected in the graph ...
    assert page.evaluate("document.body.dataset.tab") == "heads"  # ... the head stays open
    assert page.locator(f'#graph .node.selected[data-id="{q_id}"]').count() == 1
    assert page.evaluate("document.body.dataset.contributorInGraph") == "1"
    only = g["metadata"]["qk"]["qk_only"]
    block.locator(f'.pairs button.side[data-node="{only}"]').first.click()
    assert page.evaluate("document.body.dataset.contributor") == only
    assert page.evaluate("document.body.dataset.contributorInGraph") == "0"
    assert page.evaluate("document.body.dataset.selected") == q_id  # not a graph node: selection kept
    card = page.locator("#contrib-card")
    assert g["qk_only_nodes"][only]["clerp"] in card.locator("h3").first.inner_text()
    page.wait_for_selector("#contrib-body .example")  # its feature page, fetched as for a node
    assert "layer 0, feature 777" in card.inner_text()
    shot(page, "qk-contributor")
    block.locator('.pairs button.side[data-node="1_const_5"]').click()
    assert "constant" in card.inner_text() and page.locator("#contrib-body .example").count() == 0


@pytest.mark.browser
def test_head_pattern_draws_only_its_stored_rows(qk_page, qk):
    """A head_patterns entry with some `queries` only (the traced ones and the last position, as
    written for prompts over 128 tokens): exactly those rows are drawn, labelled by their query
    token, the traced cell outlined; a cell whose row is not stored gets no outline. Entries
    without `queries` (older graphs) are every row."""
    page, (g, url) = qk_page, qk
    L, h = g["metadata"]["qk"]["subset_head"]
    tokens, n_pos = g["metadata"]["prompt_tokens"], len(g["metadata"]["prompt_tokens"])
    hp = next(p for p in g["head_patterns"] if (p["layer"], p["head"]) == (L, h))
    i, t = next((i, t) for i, t in enumerate(g["qk_traces"]) if (t["layer"], t["head"]) == (L, h))
    assert hp["queries"] == [t["query_pos"], n_pos - 1] == [4, 5] and len(hp["pattern"]) == 2
    open_graph(page, url, "qk.json")
    page.click("#tab-heads")
    page.locator(f'#trace-list tr.trace-row[data-trace="{i}"] button.open-trace').click()
    assert page.evaluate("document.body.dataset.head") == f"{L}:{h}"
    svg = page.locator("#head-body svg.pattern")
    assert (svg.get_attribute("data-rows"), svg.get_attribute("data-cols")) == ("2", str(n_pos))
    cells = svg.locator(".hcell")
    assert cells.count() == 2 * n_pos
    assert [cells.nth(j * n_pos).get_attribute("data-r") for j in range(2)] == ["4", "5"]
    for c in cells.all():
        q, k = int(c.get_attribute("data-r")), int(c.get_attribute("data-c"))
        assert float(c.get_attribute("data-v")) == hp["pattern"][hp["queries"].index(q)][k]
    labels = svg.locator("text").all_text_contents()
    assert labels[:2] == [f"{q} {tokens[q].replace(' ', '␣')}" for q in hp["queries"]] == ["4 ␣France", "5 ␣is"]
    assert "2 of 6 query rows stored" in page.inner_text("#head-body .pattern-wrap")
    active = page.locator("#head-body .tracecell.active")
    assert (active.get_attribute("data-r"), active.get_attribute("data-c")) == (str(t["query_pos"]), str(t["key_pos"]))
    page.hover(f'#head-body svg.pattern .hcell[data-r="5"][data-c="2"]')
    assert f"probability {hp['pattern'][1][2]:.5f}" in page.inner_text("#tooltip")
    # from the traced edge's split: the edge's cell (query 5, key 2) is stored, so it is marked
    src, tgt = g["metadata"]["qk"]["edge"]
    page.click(f'[data-id="{tgt}"]')
    page.locator("#links-body .incoming li").filter(has_text=f"({src})").locator(".edge-btn").click()
    page.click(f'#edge-body .head-btn[data-layer="{L}"][data-head="{h}"]')
    assert page.locator("#head-body .edgecell").count() == 1
    assert page.locator('#head-body .edgecell[data-r="5"][data-c="2"]').count() == 1
    page.evaluate(f"window.cltrace.openHead({L}, {h}, {{q: 2, k: 1}})")  # query 2: its row is not stored
    assert page.locator("#head-body .edgecell").count() == 0 and page.locator("#head-body .tracecell").count() == 1
    assert page.locator("#head-body svg.pattern .hcell").count() == 2 * n_pos
    # every other head: all its rows
    page.click("#tab-heads")
    page.locator('#pattern-heads .head-btn[data-layer="1"][data-head="0"]').click()
    assert page.locator("#head-body svg.pattern .hcell").count() == n_pos * n_pos
    assert page.locator("#head-body .pattern-rows").count() == 0
    # a graph written before `queries`: the rows are the positions 0 .. n-1
    open_graph(page, url, "old.json")
    page.click("#tab-heads")
    page.locator("#trace-list tr.trace-row >> nth=0 >> button.open-trace").click()
    t0 = g["qk_traces"][0]
    pattern = next(p["pattern"] for p in g["head_patterns"] if (p["layer"], p["head"]) == (t0["layer"], t0["head"]))
    cells = page.locator("#head-body svg.pattern .hcell")
    assert cells.count() == n_pos * n_pos
    for c in cells.all():
        assert float(c.get_attribute("data-v")) == pattern[int(c.get_attribute("data-r"))][int(c.get_attribute("data-c"))]
    active = page.locator("#head-body .tracecell.active")
    assert (active.get_attribute("data-r"), active.get_attribute("data-c")) == (str(t0["query_pos"]), str(t0["key_pos"]))
    page.locator("#trace-list tr.trace-row >> nth=1 >> button.open-trace").click()  # its head: not in old.json
    assert "No attention pattern stored for this head" in page.inner_text("#head-body")


@pytest.mark.browser
def test_trace_list_opens_every_trace(qk_page, qk):
    """The Heads tab lists every QK trace (and every head with a pattern); each opens its head."""
    page, (g, url) = qk_page, qk
    open_graph(page, url, "qk.json")
    page.click("#tab-heads")
    rows = page.locator("#trace-list tr.trace-row")
    assert rows.count() == len(g["qk_traces"]) == 2
    for i, t in enumerate(g["qk_traces"]):
        rows.nth(i).locator("button.open-trace").click()
        assert page.evaluate("document.body.dataset.head") == f"{t['layer']}:{t['head']}"
        block = page.locator("#head-body .trace.active")
        assert block.get_attribute("data-trace") == str(i)
        assert block.locator(".pairs tr.pair").count() == len(t["pair_wise_contributors"])
        assert ("traced by hand" in block.inner_text()) == ("source" not in t)
    heads = page.locator("#pattern-heads .head-btn")
    assert heads.count() == len(g["head_patterns"])
    heads.first.click()  # layer 0, head 0: a pattern, no trace
    assert page.evaluate("document.body.dataset.headTraces") == "0"
    assert page.locator("#head-body svg.pattern .hcell").count() == 36
    assert "No QK trace of this head" in page.inner_text("#head-body")
    page.click('[data-id="2_40_5"]')  # the traced edge's target: its node card links the trace
    assert page.evaluate("document.body.dataset.tab") == "node"
    page.locator("#node-card .node-traces button").first.click()
    assert page.evaluate("document.body.dataset.head") == "1:0"


def inlined(viewer) -> dict:
    """The data a notebook viewer's page embeds: {"graph", "pages", "name"}."""
    import re

    m = re.search(r'<script type="application/json" id="cltrace-inline">(.*?)</script>', viewer.document, re.S)
    return json.loads(m[1])  # ("<\\/" in it: JSON's escape of "/")


def test_notebook_inlines_qk_only_feature_pages(qk_folder):
    """show() inlines the feature pages of the QK contributors only qk_only_nodes describes, as
    of the graph's own features (and none for the constants)."""
    root, g = qk_folder
    only = g["metadata"]["qk"]["qk_only"]
    data = inlined(show(root / "qk.json"))
    want = {str(n["feature"]) for n in g["nodes"] if n["node_id"] == "0_12_2"} | {str(g["qk_only_nodes"][only]["feature"])}
    assert set(data["pages"]) == want and len(want) == 2
    assert data["pages"][str(g["qk_only_nodes"][only]["feature"])] == feature_page(g["qk_only_nodes"][only]["feature"])
    assert inlined(show(g))["pages"] == {}  # a dict: no folder, no pages


@pytest.mark.browser
def test_notebook_shows_a_qk_only_contributors_page(browser, qk_folder):
    """In the notebook page (no server), a qk-only feature contributor's card shows its inlined
    feature page, as a graph node's card does; no request leaves the page."""
    root, g = qk_folder
    only, t = g["metadata"]["qk"]["qk_only"], g["qk_traces"][0]
    pg = browser.new_page()
    errors, requests = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: requests.append(r.url))
    pg.set_content(show(root / "qk.json").document)
    pg.wait_for_function("document.body.dataset.ready === '1'")
    pg.click("#tab-heads")
    pg.locator('#trace-list tr.trace-row[data-trace="0"] button.open-trace').click()
    assert pg.evaluate("document.body.dataset.head") == f"{t['layer']}:{t['head']}"
    pg.locator(f'#head-body .trace.active .pairs button.side[data-node="{only}"]').first.click()
    assert pg.evaluate("document.body.dataset.contributorInGraph") == "0"
    pg.wait_for_selector("#contrib-body .example")
    assert pg.locator("#contrib-body .quantile.top .example").count() == 2
    assert "layer 0, feature 777" in pg.inner_text("#contrib-card")
    pg.locator('#head-body .trace.active .pairs button.side[data-node="0_12_2"]').first.click()  # a graph node
    pg.wait_for_selector("#contrib-body .example")
    assert pg.evaluate("document.body.dataset.selected") == "0_12_2"
    assert errors == [] and [u for u in requests if not u.startswith(("data:", "about:"))] == []
    pg.close()


# --- the attention panels on a graph of the real writer (the tiny model, traced with --qk) ------

@pytest.fixture(scope="module")
def tiny_qk(tmp_path_factory):
    """A server (no model) over tinyqk.json: the tiny model's graph (clt+skip, every active feature
    visited), pruned, its attention explained (QK traces of the heads of the top edges into 3
    nodes) and written by cltrace.export.neuronpedia as `cltrace attribute --qk` writes it."""
    from cltrace.attention import QKSettings, explain_attention
    from cltrace.attribution import attribute
    from cltrace.export.neuronpedia import to_neuronpedia
    from cltrace.graph import prune
    from support.tiny_gemma import tiny_replacement

    rm = tiny_replacement("clt+skip", skip_positions=1)
    graph = attribute(TOKENS, rm, max_feature_nodes=None)
    result = prune(graph)
    report = explain_attention(rm, graph, result, QKSettings(qk=True, qk_nodes=3))
    g = to_neuronpedia(graph, "tinyqk", result, attention=report)
    root = tmp_path_factory.mktemp("tinyqk")
    (root / "tinyqk.json").write_text(json.dumps(g, separators=(",", ":"), allow_nan=False))
    g = json.loads((root / "tinyqk.json").read_text())  # (as the page reads it)
    with serving(root) as url:
        yield g, url


@pytest.fixture
def tiny_qk_page(browser, tiny_qk):
    yield from recording_page(browser, tiny_qk[1])  # (no page error, no foreign request)


@pytest.mark.browser
def test_attention_panels_on_a_written_graph(tiny_qk_page, tiny_qk):
    """The real writer's graph, clicked through: every Flow cell selects exactly the nodes of its
    layer and position; the traced links' splits by heads sum to their weights as shown; every
    QK trace opens its head, whose pattern has a row and a column per position, with all its
    pairs and marginals; a contributor only in qk_only_nodes shows its card."""
    import re

    page, (g, url) = tiny_qk_page, tiny_qk
    n_pos, ids = len(g["metadata"]["prompt_tokens"]), {n["node_id"] for n in g["nodes"]}
    rel, traces, only = g["relevance"], g["qk_traces"], g["qk_only_nodes"]
    assert traces and g["head_patterns"] and all("heads" in lk for lk in g["links"])
    open_graph(page, url, "tinyqk.json")
    assert page.locator("#graph .node").count() == len(g["nodes"])
    assert page.is_visible("#tab-flow") and page.is_visible("#tab-heads")

    # Flow: each cell selects the nodes with its layer (E: the tokens) and ctx_idx
    page.click("#tab-flow")
    assert page.locator("#flow-map .hcell").count() == len(rel["rows"]) * n_pos
    sizes = []
    for r, values in zip(rel["rows"], rel["values"]):
        for p in range(n_pos):
            want = {n["node_id"] for n in g["nodes"] if n["layer"] == r and n["ctx_idx"] == p}
            c = page.locator(f'#flow-map .hcell[data-r="{r}"][data-c="{p}"]')
            assert float(c.get_attribute("data-v")) == values[p]
            c.click()
            assert page.evaluate("document.body.dataset.cell") == f"{r}:{p}"
            assert int(page.evaluate("document.body.dataset.cellSelected")) == len(want)
            assert ids_of(page, "#graph .node.incell") == want, (r, p)
            assert page.locator("#cell-list li").count() == len(want)
            sizes.append(len(want))
    assert max(sizes) >= 2 and min(sizes) == 0

    # Edge cards: the links QK traces explain, each split by heads summing to its weight
    links = {(lk["source"], lk["target"]): lk for lk in g["links"]}
    for src, tgt in dict.fromkeys((t["source"], t["target"]) for t in traces if "source" in t):
        link, h = links[(src, tgt)], links[(src, tgt)]["heads"]
        page.click(f'[data-id="{tgt}"]')
        page.locator("#links-body .incoming li").filter(has_text=f"({src})").locator(".edge-btn").click()
        assert page.evaluate("document.body.dataset.edge") == f"{src}>{tgt}"
        parts = [float(x.get_attribute("data-v")) for x in page.locator("#edge-body tr.part").all()]
        assert parts == [h["residual"], *[w for _, _, w in h["one_hop"]], h["other_one_hop"], h["multi_hop"]]
        assert len(h["one_hop"]) >= 1 and sum(parts) == pytest.approx(link["weight"], rel=1e-5, abs=1e-7)
        assert float(page.evaluate("document.body.dataset.edgeWeight")) == link["weight"]
        shown = page.inner_text("#edge-body .sum:not(.bad)")  # "sum of the parts +x = weight +y"
        m = re.fullmatch(r"sum of the parts ([-+][0-9.]+) = weight ([-+][0-9.]+)", shown)
        assert m and float(m[1]) == pytest.approx(float(m[2]), abs=2e-6), shown
        assert [(int(b.get_attribute("data-layer")), int(b.get_attribute("data-head")))
                for b in page.locator("#edge-body .head-btn").all()] == [(L, hd) for L, hd, _ in h["one_hop"]]

    # Heads: every trace, its head's pattern (n × n) and its contributors
    page.click("#tab-heads")
    assert page.locator("#trace-list tr.trace-row").count() == len(traces)
    assert page.locator("#pattern-heads .head-btn").count() == len(g["head_patterns"])
    patterns = {(p["layer"], p["head"]): p for p in g["head_patterns"]}
    for i, t in enumerate(traces):
        page.click("#tab-heads")
        page.locator(f'#trace-list tr.trace-row[data-trace="{i}"] button.open-trace').click()
        assert page.evaluate("document.body.dataset.head") == f"{t['layer']}:{t['head']}"
        hp = patterns[(t["layer"], t["head"])]
        assert hp["queries"] == list(range(n_pos))  # (a short prompt: every row)
        svg = page.locator("#head-body svg.pattern")
        assert (svg.get_attribute("data-rows"), svg.get_attribute("data-cols")) == (str(n_pos), str(n_pos))
        cells = svg.locator(".hcell")
        assert cells.count() == n_pos * n_pos
        assert [float(c.get_attribute("data-v")) for c in cells.all()] == [x for row in hp["pattern"] for x in row]
        active = page.locator("#head-body .tracecell.active")
        assert (active.get_attribute("data-r"), active.get_attribute("data-c")) == (str(t["query_pos"]), str(t["key_pos"]))
        assert float(cells.nth(t["query_pos"] * n_pos + t["key_pos"]).get_attribute("data-v")) == \
            pytest.approx(t["prob"], abs=1e-5)  # (the pattern: rounded to 5 decimals)
        block = page.locator("#head-body .trace.active")
        assert block.get_attribute("data-trace") == str(i)
        assert block.locator(".pairs tr.pair").count() == len(t["pair_wise_contributors"])
        assert [float(r.get_attribute("data-attr")) for r in block.locator(".pairs tr.pair").all()] == \
            [a for _, _, a in t["pair_wise_contributors"]]
        assert block.locator(".qmarg tr.marg-row").count() == len(t["top_q_marginal_contributors"])
        assert block.locator(".kmarg tr.marg-row").count() == len(t["top_k_marginal_contributors"])
        sides = [x for q, k, _ in t["pair_wise_contributors"] for x in (q, k)]
        assert {b.get_attribute("data-node") for b in block.locator(".pairs button.side.in-graph").all()} == set(sides) & ids
        assert {b.get_attribute("data-node") for b in block.locator(".pairs button.side.qk-only").all()} == set(sides) - ids
        assert set(sides) <= ids | set(only)  # every contributor described

    # a contributor that is only in qk_only_nodes (a feature the graph did not visit, if any;
    # else one it pruned): its card
    cands = [(i, x) for i, t in enumerate(traces) for q, k, _ in t["pair_wise_contributors"]
             for x in (q, k) if x in only and x not in ids and only[x]["feature_type"] == "cross layer transcoder"]
    i, cid = min(cands, key=lambda c: only[c[1]]["influence"] is not None)
    n = only[cid]
    page.click("#tab-heads")
    page.locator(f'#trace-list tr.trace-row[data-trace="{i}"] button.open-trace').click()
    selected = page.evaluate("document.body.dataset.selected")
    page.locator(f'#head-body .trace.active .pairs button.side[data-node="{cid}"]').first.click()
    assert page.evaluate("document.body.dataset.contributor") == cid
    assert page.evaluate("document.body.dataset.contributorInGraph") == "0"
    assert page.evaluate("document.body.dataset.selected") == selected  # not a graph node: selection kept
    card = page.locator("#contrib-card")
    assert card.is_visible() and "no (qk_only_nodes)" in card.inner_text()
    L, f, p = cid.split("_")
    assert card.locator("h3").first.inner_text() == (n["clerp"] or f"L{L} #{f}")
    dl = card.locator("#contrib-body > dl")
    fields = dict(zip(dl.locator("dt").all_text_contents(), dl.locator("dd").all_text_contents()))
    assert fields["id"] == cid and fields["layer"] == L and fields["feature"] == f
    assert fields["position"].startswith(f"{p} (") and fields["activation"] == f"{n['activation']:.4f}"
    assert fields["influence"] == ("– (not visited)" if n["influence"] is None else f"{n['influence']:.4f}")
    page.wait_for_selector("#contrib-body .nopage")  # (the graph's scan is a model name: no pages)


# --- the real Gemma 3 270M with the starter transcoders the committed graph was made with ---

GRAPH = "the-capital-of-france-is.json"  # the README's main graph, as `cltrace attribute` names it


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A server over the README's main graph, traced here with the default starter set, and
    that model loaded. (Traced anew, not the committed graphs/ copy: the starter set is trained
    on the machine that first runs cltrace, and float32 training on another CPU — AVX2 against
    AVX-512 kernels — ends in slightly different weights under the same set id.)"""
    import argparse

    from cltrace.cli import main
    from cltrace.commands._common import load_replacement

    root = tmp_path_factory.mktemp("real")
    assert main(["attribute", "The capital of France is", "--out", str(root), "--features", "none",
                 "--quiet"]) == 0  # (the pages: not needed here, and a first run would build them)
    g = json.loads((root / GRAPH).read_text())
    tcs = (g["metadata"].get("transcoder_list") or [""])[0]
    assert tcs.startswith("cltrace-starter/"), f"{GRAPH} was not made with the starter set: {tcs}"
    args = argparse.Namespace(model="gemma-3-270m", transcoders=None, device="cpu", dtype=None)
    _, rm = load_replacement(args, lambda *a: None)  # the default starter set (trained once)
    assert rm.transcoders.info["set_id"] == tcs
    srv = make_server(root, port=0, rm=rm)
    serve_in_thread(srv)
    yield rm, g, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.mark.browser
@pytest.mark.real_model
def test_real_model_ablation_matches_api_and_edges(browser, real):
    """Ablate the feature with the strongest direct link to the top logit, from the page."""
    from cltrace.serve.experiments import prompt_tokens

    rm, g, url = real
    top = max((n for n in g["nodes"] if n["feature_type"] == "logit"), key=lambda n: n["token_prob"])
    feats = {n["node_id"] for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"}
    edge = max((link for link in g["links"] if link["target"] == top["node_id"] and link["source"] in feats),
               key=lambda link: abs(link["weight"]))
    src = edge["source"]
    pg = browser.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{url}/#graph={GRAPH}")
    pg.wait_for_function("document.body.dataset.ready === '1'")
    assert pg.locator("#graph .node").count() == len(g["nodes"])
    pg.click(f'[data-id="{src}"]')
    pg.click("#target-selected")
    pg.fill("#exp-tokens", "6")
    pg.click("#exp-run")
    pg.wait_for_function("document.body.dataset.experiment === 'done'", timeout=600_000)
    shot(pg, "experiment-real")
    L, f, p = map(int, src.split("_"))
    res = intervene(rm, prompt_tokens(g), [Intervention(L, f, pos=p, set=0.0)], mode="frozen", freeze_features=True)
    p1 = torch.softmax(res.logits[-1].double(), -1)
    for r in pg.locator("#exp-top tr[data-token]").all():
        assert float(r.get_attribute("data-after")) == float(p1[int(r.get_attribute("data-token"))])
    row = pg.locator(f'#exp-logits tr[data-node="{top["node_id"]}"]')
    measured, predicted = float(row.get_attribute("data-measured")), float(row.get_attribute("data-predicted"))
    print(f"ablate {src} (edge {edge['weight']:.6g} into {top['node_id']}): Δ measured {measured:.8g}, "
          f"predicted {predicted:.8g}, relative difference {abs(predicted - measured) / abs(measured):.2e}")
    # the edge (attribute()) against the intervention: the same number up to float32 rounding, as
    # in tests/test_attribution.py. Measured: 3.2e-6 relative for this link (|Δ| 0.25); over 228
    # (feature, logit) pairs of this graph (40 features ablated one at a time) at most 1.0e-6
    # apart (the rounding of logits near 20), 9.2e-5 relative at |Δ| > 1e-2. (Was rel 1e-2.)
    assert predicted == pytest.approx(measured, rel=1e-4)
    assert predicted == pytest.approx(-edge["weight"], rel=1e-6)  # ablation: Δa = -a, so Δ = -A[t, s]
    assert (measured > 0) == (edge["weight"] < 0)
    assert errors == []
    pg.close()
