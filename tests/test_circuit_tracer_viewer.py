"""A graph folder of ``cltrace attribute --features DIR`` read by circuit-tracer 0.5.0's OWN
local server (``circuit_tracer.frontend.local_server.serve``, run from its venv
``benchmarks/.venv-peer``), fetched over HTTP exactly as its viewer's JavaScript fetches it.

What the viewer requests and reads (file:line in ``circuit_tracer/frontend/``):

- ``local_server.py:59-91``: ``/data/X`` and ``/graph_data/X`` (query string dropped) are the
  file ``data_dir/X``, 404 when missing, served as JSON; any other path is a file of
  ``assets/`` (``index.html``...). The server binds all interfaces (``("", port)``, :216).
- ``assets/index.html:41-42``: ``window.isLocalServing = true``, then
  ``getFile('./data/graph-metadata.json')``; reads ``graphs[].slug``, ``.scan``, ``.prompt``,
  ``.title_prefix`` (optional), ``.node_threshold`` (a number starts the pruning slider at it,
  :54-56, :203-247).
- ``assets/attribution_graph/init-cg.js:2``: the graph is ``./graph_data/{slug}.json``; reads
  ``metadata.scan``, ``metadata.schema_version`` (:17-18), ``qParams`` (:24, and
  ``data.qParams.clerps`` unguarded at :54, ``data.qParams.gridsnap`` :209: ``qParams`` must
  be an object), ``nodes[].isLogit`` (:48).
- ``assets/attribution_graph/util-cg.js:194-357`` (``formatData``): ``metadata.prompt_tokens``
  (strings, :212); per node ``feature_type`` (a string: ``.includes('error')`` :235),
  ``layer``, ``feature``, ``ctx_idx`` (``featureId = layer_feature_ctx`` :216, prompt token
  of ``ctx_idx`` :241-244), ``node_id`` (:255), ``clerp`` (a logit's ``...(p=X)`` is parsed
  :256), ``influence`` (with the slider on, only embeddings, logits and nodes with
  ``influence <= threshold`` stay, :202-209), ``probe_location_idx``, ``vis_link`` (optional);
  links ``source``/``target`` (node ids; other links dropped :278) and ``weight``.
- ``assets/attribution_graph/init-cg-feature-detail.js:36-37,53-126``: a clicked node whose
  ``feature_type`` is ``"cross layer transcoder"`` gets its page; under ``schema_version > 0``
  its ``feature`` is unpaired with ``util.cantorUnpair`` (``assets/util.js:229-235``,
  ``[layer, index]``) for the label; ``activation`` (a number) shows the histogram (:59-72).
- ``assets/feature_examples/init-feature-examples.js:85-106`` (``loadFeature``): when
  ``scan`` starts with ``./`` the page is ``getFile(`${scan}/${feature}.json`)``, relative to
  the page (``/index.html``), so ``./data/features/N.json`` -> ``/data/features/N.json`` ->
  ``data_dir/features/N.json``; a scan starting ``./features/`` would be rewritten to
  Anthropic's CDN (``util.js:45-47``). Reads ``act_min``/``act_max`` (defaults when missing).
- ``assets/feature_examples/init-feature-examples-logits.js:3-17``: ``top_logits``,
  ``bottom_logits`` (lists of strings). ``init-feature-examples-list.js:4,15,26,28,129-148``:
  ``isDead``, ``examples_quantiles[].quantile_name``, ``.examples[]`` with ``tokens`` (strings),
  ``tokens_acts_list`` (numbers, one per token), ``train_token_ind`` (an index into them),
  ``is_repeated_datapoint``.
- ``assets/attribution_graph/render-act-histogram.js:46-68``: ``quantile_values`` (numbers),
  ``activation_frequency`` (a number), ``histogram`` (numbers), ``act_min``/``act_max``.
- ``graph_models.py`` (pydantic ``Model``: metadata, qParams, nodes, links) is what
  circuit-tracer's own writer uses; ``feature_models.py`` (pydantic) is defined but used nowhere
  in circuit-tracer 0.5.0 and requires a ``transcoder_id`` string the viewer never reads.

Upstream limitation: ``index.html:15-20`` loads d3, jetpack and npy_v0 from
transformer-circuits.pub and dagre and pako from unpkg.com, so circuit-tracer's viewer cannot
render without network, whatever the JSON. Seen once in headless Chromium with those six
requests aborted (2026-12-01, not part of this test): every local asset loads, the page fetches
``/data/graph-metadata.json`` (200, parsed), then ``index.html:59`` ``d3.select('.nav')`` throws
(``d3`` is undefined) inside the async ``init``: nothing is drawn, the graph JSON and pages are
never requested. This test checks every byte it would fetch from its
own server and every field its code reads, not the drawing (``cltrace serve`` renders offline,
tests/test_labelled_graph.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest

from support.peer import PEER_PY, ROOT, peer_available

pytestmark = pytest.mark.peer  # circuit-tracer 0.5.0 in its venv

BOS, VOCAB, CTX = 2, 64, 24
WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # the tokenizer's words after the 4 specials
PROMPT = "w10 w20 w30 w40 w50"  # kept features in layers 0 and 1
SLUG = "tiny"
FEATURE = "cross layer transcoder"

SERVER = """
import sys
from circuit_tracer.frontend.local_server import serve
srv = serve(data_dir=sys.argv[1], port=0)
print(srv.httpd.server_address[1], flush=True)
sys.stdin.read()  # serve until the test closes stdin
srv.stop()
"""

VALIDATE = """
import json, sys
from circuit_tracer.frontend import feature_models, graph_models
graph = graph_models.Model.model_validate(json.load(open(sys.argv[1])))
out = {"nodes": len(graph.nodes), "pages": {}}
for path in sys.argv[2:]:
    page = json.load(open(path))
    quantiles = [feature_models.ExamplesQuantile.model_validate(q) for q in page["examples_quantiles"]]
    try:
        feature_models.Model.model_validate(page)
        missing = []
    except Exception as e:
        missing = sorted(str(err["loc"][0]) for err in e.errors())
    out["pages"][path] = {"quantiles": len(quantiles), "missing": missing}
print(json.dumps(out))
"""


def js_cantor_unpair(z: int) -> tuple[int, int]:
    """``util.cantorUnpair`` of circuit-tracer's viewer (assets/util.js:229-235), in floats as
    the browser computes it: ``[layer, index]``."""
    w = math.floor((math.sqrt(8 * z + 1) - 1) / 2)
    y = z - (w * w + w) / 2
    return int(w - y), int(y)


@pytest.fixture(scope="module")
def peer_python():
    if not peer_available():
        if os.environ.get("CI"):
            pytest.fail("circuit-tracer's venv (benchmarks/.venv-peer) is missing: .ci/run creates it")
        pytest.skip("circuit-tracer's venv is not there (`python tests/support/peer.py` creates it)")
    return str(PEER_PY)


@pytest.fixture(scope="module")
def graph_folder(tmp_path_factory):
    """``cltrace features`` then ``cltrace attribute --features --qk``, the real commands, on a tiny
    random Gemma 3 saved with a word-level tokenizer and its transcoders in the Gemma Scope 2
    layout: the folder the user would point circuit-tracer's server at."""
    from cltrace.cli import main
    from cltrace.transcoders.write import save_gemmascope
    from support.tiny_gemma import save_word_tokenizer, tiny_model_and_set

    model, _, ts = tiny_model_and_set(20, VOCAB, CTX, BOS)
    root = tmp_path_factory.mktemp("ctview")
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", WORDS)
    save_gemmascope(ts, root / "tc")
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text("\n\n\n".join(" ".join(rng.choice(WORDS, size=40)) for _ in range(12)))
    common = ["--model", str(root / "model"), "--transcoders", str(root / "tc"), "--quiet"]
    assert main(["features", *common, "--corpus", str(root / "corpus.txt"), "--tokens", "300",
                 "--ctx", str(CTX), "--top-k", "5", "--samples", "8", "--window", "3",
                 "--batch-rows", "4", "--out", str(root / "pages")]) == 0
    assert main(["attribute", PROMPT, *common, "--features", str(root / "pages"), "--qk",
                 "--out", str(root / "graph"), "--slug", SLUG, "--format", "json"]) == 0
    return root / "graph"


@pytest.fixture(scope="module")
def server(peer_python, graph_folder):
    """circuit-tracer's own ``serve(data_dir=graph folder)`` in its venv; yields its base URL."""
    proc = subprocess.Popen([peer_python, "-c", SERVER, str(graph_folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield f"http://127.0.0.1:{int(line)}/"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, b"", ""


def get_json(url: str):
    status, body, ctype = get(url)
    assert status == 200, (url, status)
    assert ctype == "application/json", (url, ctype)
    return json.loads(body)


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def viewer_graph(server):
    """The requests of index.html and init-cg.js: graph list, then the first graph."""
    graphs = get_json(urljoin(server + "index.html", "./data/graph-metadata.json"))["graphs"]
    return graphs, get_json(urljoin(server + "index.html", f"./graph_data/{graphs[0]['slug']}.json"))


def test_the_server_serves_the_viewer_and_the_graph(server, graph_folder):
    status, html, _ = get(server + "index.html")
    assert status == 200 and b"window.isLocalServing = true" in html  # its own assets
    graphs, data = viewer_graph(server)
    entry = next(g for g in graphs if g["slug"] == SLUG)
    assert isinstance(entry["prompt"], str) and isinstance(entry["scan"], str)
    assert is_num(entry["node_threshold"])
    assert data == json.loads((graph_folder / f"{SLUG}.json").read_text())
    assert get(server + "graph_data/missing.json")[0] == 404


def test_every_field_the_graph_code_reads(server):
    graphs, data = viewer_graph(server)
    meta = data["metadata"]
    assert meta["schema_version"] == 1 and isinstance(data["qParams"], dict)
    tokens = meta["prompt_tokens"]
    assert tokens and all(isinstance(t, str) for t in tokens)
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"])
    types = {n["feature_type"] for n in data["nodes"]}
    assert types <= {FEATURE, "mlp reconstruction error", "embedding", "logit"} and FEATURE in types
    for n in data["nodes"]:
        assert isinstance(n["layer"], str) and isinstance(n["feature"], int) and isinstance(n["clerp"], str)
        assert 0 <= n["ctx_idx"] < len(tokens)
        if n["feature_type"] == "logit":
            assert is_num(float(n["clerp"].split("(p=")[1].split(")")[0]))
        else:
            assert is_num(n["influence"])
        if n["feature_type"] == FEATURE:
            assert is_num(n["activation"]) and n["clerp"]
    assert data["links"] and all(l["source"] in ids and l["target"] in ids and is_num(l["weight"])
                                 for l in data["links"])
    # The viewer opens with its pruning slider at the list's node_threshold and hides the
    # nodes above it: only the one node whose cumulative influence crosses the threshold,
    # which pruning keeps (as circuit-tracer's own find_threshold does).
    threshold = next(g for g in graphs if g["slug"] == SLUG)["node_threshold"]
    above = [n for n in data["nodes"] if n["feature_type"] not in ("embedding", "logit")
             and n["influence"] > threshold]
    assert len(above) <= 1


def test_a_clicked_features_page_is_that_feature(server, graph_folder):
    _, data = viewer_graph(server)
    scan = data["metadata"]["scan"]
    assert scan.startswith("./") and not scan.startswith("./features/")  # local, not the CDN
    feats = [n for n in data["nodes"] if n["feature_type"] == FEATURE]
    assert len({n["layer"] for n in feats}) >= 2 and any(int(n["layer"]) > 0 for n in feats)
    for n in feats:  # every feature node, layers 0-2
        url = urljoin(server + "index.html", f"{scan}/{n['feature']}.json")
        assert url == f"{server}data/features/{n['feature']}.json"
        page = get_json(url)
        layer, index = js_cantor_unpair(n["feature"])
        node_layer, node_index, _ = map(int, n["node_id"].split("_"))
        assert (layer, index) == (node_layer, node_index) == (page["layer"], page["index"])
        assert str(layer) == n["layer"]
        assert n["clerp"] == page["label"]
        assert page["transcoder_id"] == data["metadata"]["transcoder_list"][0]
        assert not page.get("isDead")
        # init-feature-examples-logits.js
        for key in ("top_logits", "bottom_logits"):
            assert isinstance(page[key], list) and all(isinstance(t, str) for t in page[key])
        assert page["top_logits"]
        # init-feature-examples-list.js
        assert page["examples_quantiles"] and page["examples_quantiles"][0]["examples"]
        for q in page["examples_quantiles"]:
            assert isinstance(q["quantile_name"], str) and q["examples"]
            for ex in q["examples"]:
                assert ex["tokens"] and all(isinstance(t, str) for t in ex["tokens"])
                assert len(ex["tokens_acts_list"]) == len(ex["tokens"])
                assert all(is_num(a) for a in ex["tokens_acts_list"])
                assert isinstance(ex["train_token_ind"], int) and 0 <= ex["train_token_ind"] < len(ex["tokens"])
                assert ex["tokens_acts_list"][ex["train_token_ind"]] > 0
                assert isinstance(ex["is_repeated_datapoint"], bool)
        # render-act-histogram.js and the colour scale
        assert is_num(page["act_min"]) and is_num(page["act_max"]) and page["act_min"] <= page["act_max"]
        assert page["quantile_values"] and all(is_num(v) for v in page["quantile_values"])
        assert page["histogram"] and all(is_num(v) for v in page["histogram"]) and sum(page["histogram"]) > 0
        assert is_num(page["activation_frequency"]) and 0 < page["activation_frequency"] <= 1
    # the pages of the feature nodes and of the QK contributors the graph describes aside (--qk)
    extra = [n for n in data.get("qk_only_nodes", {}).values() if n["feature_type"] == FEATURE]
    assert len(list((graph_folder / "features").iterdir())) == len({n["feature"] for n in feats + extra})
    assert get(f"{server}data/features/{max(n['feature'] for n in feats) + 1}.json")[0] == 404


def test_circuit_tracers_pydantic_models_accept_the_folder(peer_python, graph_folder):
    pages = sorted(str(p) for p in (graph_folder / "features").iterdir())
    res = subprocess.run([peer_python, "-c", VALIDATE, str(graph_folder / f"{SLUG}.json"), *pages],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    data = json.loads((graph_folder / f"{SLUG}.json").read_text())
    assert out["nodes"] == len(data["nodes"])
    assert len(out["pages"]) == len(pages)
    for path, v in out["pages"].items():
        assert v["quantiles"] == len(json.loads(Path(path).read_text())["examples_quantiles"])
        assert v["missing"] == [], (path, v)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
