"""Fixtures for the viewer tests: graph JSONs, a feature page, a headless Chromium.

* :func:`tiny_setup` — a tiny random Gemma 3 with calibrated transcoders, and a graph JSON of
  it whose token → feature and feature → logit link weights are the edges ``A[t, s]`` of
  :func:`cltrace.attribute` (the real attribution, every active feature visited), one of them
  left out as if pruned. The viewer's "edges predict the change" check then compares the
  attribution with an intervention (frozen mode, other features held:
  ``Δ(centred logit_t) = A[t, s] / a_s · Δa_s``), two independent computations.
* :func:`synthetic_graph` — a graph JSON of any size (the big-graph test: ~1,200 nodes,
  ~300k links), valid node ids, Cantor-paired ``feature`` fields (schema_version 1).
* :func:`qk_graph` — a small graph JSON with the attention fields (``relevance``, ``heads`` on
  links, ``qk_traces``, ``qk_only_nodes``, ``head_patterns``), consistent with itself.
* :func:`feature_page` — a hand-written feature page in the format of docs/interop.md.
* :func:`launch_chromium` — Playwright driving the system Chromium (no download).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile

import pytest
import torch

from cltrace.export.neuronpedia import cantor_pair as cantor

from .tiny_gemma import TOKENS, tiny_replacement

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _node(nid, feature, layer, pos, ftype, influence=None, activation=None, clerp="", prob=0.0):
    return {"node_id": nid, "feature": feature, "layer": str(layer), "ctx_idx": pos,
            "feature_type": ftype, "jsNodeId": nid, "clerp": clerp, "token_prob": prob,
            "is_target_logit": False, "influence": influence, "activation": activation}


def _graph(slug, tokens, token_ids, nodes, links, scan="./features"):
    return {"metadata": {"slug": slug, "scan": scan, "prompt_tokens": tokens, "prompt": "".join(tokens),
                         "node_threshold": 0.8, "schema_version": 1, "info": {"generator": {"name": "test"}}},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


def embed_nodes(token_ids, tokens):
    return [_node(f"E_{t}_{p}", p, "E", p, "embedding", influence=0.5, clerp=f'Emb: "{tokens[p]}"')
            for p, t in enumerate(token_ids)]


def synthetic_graph(n_pos=12, n_layers=18, n_nodes=1184, n_links=296_000, seed=0) -> dict:
    """A random graph JSON: embeddings, features, errors, 10 logits; links go upwards."""
    rng = random.Random(seed)
    tokens = [f"tok{p}" for p in range(n_pos)]
    ids = [rng.randrange(1000, 200000) for _ in range(n_pos)]
    nodes = embed_nodes(ids, tokens)
    n_inner = n_nodes - n_pos - 10
    infl = sorted(rng.uniform(0.0, 0.8) for _ in range(n_inner))
    used, i = set(), 0
    while i < n_inner:
        L, p = rng.randrange(n_layers), rng.randrange(1, n_pos)
        f = -1 if i % 7 == 0 else rng.randrange(16384)
        if (L, f, p) in used:
            continue
        used.add((L, f, p))
        if f < 0:
            nodes.append(_node(f"{L}_-1_{p}", -1, L, p, "mlp reconstruction error", influence=infl[i]))
        else:
            nodes.append(_node(f"{L}_{f}_{p}", cantor(L, f), L, p, "cross layer transcoder",
                               influence=infl[i], activation=rng.uniform(0.1, 10)))
        i += 1
    for k in range(10):
        tok = 300 + k
        nodes.append(_node(f"{n_layers + 1}_{tok}_{n_pos - 1}", tok, n_layers + 1, n_pos - 1, "logit",
                           clerp=f'Output "w{k}" (p={0.3 / (k + 1):.3f})', prob=0.3 / (k + 1)))
    rank = {n["node_id"]: (-1 if n["layer"] == "E" else int(n["layer"])) for n in nodes}
    order = sorted(nodes, key=lambda n: rank[n["node_id"]])
    links, seen, N = [], set(), len(order)
    while len(links) < n_links:
        a, b = rng.randrange(N), rng.randrange(N)
        s, t = order[min(a, b)], order[max(a, b)]
        if rank[s["node_id"]] >= rank[t["node_id"]] or t["layer"] == "E" or s["feature_type"] == "logit":
            continue
        key = (s["node_id"], t["node_id"])
        if key in seen:
            continue
        seen.add(key)
        links.append({"source": key[0], "target": key[1], "weight": rng.gauss(0, 1)})
    return _graph("big-synthetic", tokens, ids, nodes, links)


def qk_graph(seed: int = 0) -> dict:
    """A small graph JSON carrying every attention field of docs/interop.md ("Every graph also
    carries relevance", "Attention"), consistent with itself: 6 tokens, 3 layers.

    * ``relevance``: rows E, 0, 1, 2 × 6 positions, non-negative;
    * links with ``heads`` whose parts sum to the weight (residual only on same-position links);
    * ``head_patterns``: causal, row-stochastic patterns of the heads named below, with their
      ``queries``: every position, except head (2, 1): rows 4 (its trace's) and 5 (the last);
    * ``qk_traces``: two traces: (layer 1, head 0, query 5, key 2) for the edge
      ``0_12_2`` → ``2_40_5`` (its target carries ``qk_tracing_results``), and one asked by hand
      (layer 2, head 1, query 4, key 4); every identity holds (Σ pairs + pairs_rest = score, ...);
    * ``qk_only_nodes``: a feature the graph did not visit (``0_777_2``) and the constants
      ``1_const_2``, ``1_const_5``, ``2_const_4``.

    ``metadata["qk"]`` records the ids the tests look for (the traced edge, the cell with two
    nodes, the qk-only feature, the head with some query rows only)."""
    rng = random.Random(seed)
    tokens = ["<bos>", "The", " capital", " of", " France", " is"]
    ids = [2, 818, 6451, 529, 7001, 563]
    n_layers, n_pos = 3, len(tokens)
    nodes = embed_nodes(ids, tokens)
    feats = [(0, 12, 2, "capital (noun)"), (0, 30, 4, "France"), (0, 31, 4, "country names"),
             (1, 7, 4, "European country"), (0, 5, 5, "'is' (copula)"), (1, 21, 5, "'is' after a subject"), (2, 40, 5, "say a capital city"),
             (2, 41, 5, "say Paris"), (1, 3, 2, "capital of ...")]
    for i, (L, f, p, label) in enumerate(feats):
        nodes.append(_node(f"{L}_{f}_{p}", cantor(L, f), L, p, "cross layer transcoder",
                           influence=round(0.05 + 0.09 * i, 3), activation=round(rng.uniform(0.5, 6), 3), clerp=label))
    nodes.append(_node("1_-1_5", -1, 1, 5, "mlp reconstruction error", influence=0.6))
    for k, (tok, word, prob) in enumerate([(9079, " Paris", 0.62), (9080, " Lyon", 0.05)]):
        nodes.append(_node(f"{n_layers + 1}_{tok}_{n_pos - 1}", tok, n_layers + 1, n_pos - 1, "logit",
                           clerp=f'Output "{word}" (p={prob:.3f})', prob=prob))

    def layer(nid):
        head = nid.split("_")[0]
        return -1 if head == "E" else int(head)

    def pos(nid):
        return int(nid.rsplit("_", 1)[1])

    pairs = [("E_6451_2", "0_12_2"), ("E_7001_4", "0_30_4"), ("E_7001_4", "0_31_4"), ("0_30_4", "1_7_4"),
             ("0_12_2", "1_3_2"), ("0_12_2", "2_40_5"), ("0_30_4", "2_41_5"), ("1_7_4", "2_41_5"),
             ("1_21_5", "2_40_5"), ("E_563_5", "0_5_5"), ("0_5_5", "1_21_5"), ("1_-1_5", "2_40_5"), ("1_3_2", "2_40_5"),
             ("2_40_5", "4_9079_5"), ("2_41_5", "4_9079_5"), ("2_40_5", "4_9080_5"), ("1_7_4", "4_9079_5")]
    heads_named = set()
    links = []
    for s, t in pairs:
        w = round(rng.choice([-1, 1, 1, 1]) * rng.uniform(0.05, 1.5), 6)
        if (s, t) == ("0_12_2", "2_40_5"):
            w = 1.079867  # the traced edge: a strong positive one
        lo, hi = layer(s) + 1, min(n_layers - 1, layer(t))  # the layers of heads between the two nodes
        heads = [(L, h) for L in range(lo, hi + 1) for h in range(2)]
        if (s, t) == ("0_12_2", "2_40_5"):  # the traced edge: its two heads listed first
            heads = [(1, 0), (2, 1)] + [x for x in heads if x not in ((1, 0), (2, 1))]
        same = pos(s) == pos(t)
        residual = (w if not heads else round(w * rng.uniform(0.2, 0.5), 6)) if same else 0.0
        listed = heads[:3]  # "at most 8" in real graphs; 3 here, so that other_one_hop is used
        other = round(w * 0.04, 6) if len(heads) > 3 else 0.0
        multi = round(w * 0.12, 6) if hi > lo else 0.0  # two or more heads: only across two layers
        shares = [rng.uniform(0.2, 1.0) + (2.0 if (s, t) == ("0_12_2", "2_40_5") and k == 0 else 0) for k in range(len(listed))]
        left = w - residual - other - multi
        hops = [[L, h, round(left * x / sum(shares), 6)] for (L, h), x in zip(listed, shares)]
        if hops:  # the last listed head takes the rounding: the parts sum to the weight
            hops[-1][2] = w - residual - other - multi - sum(x[2] for x in hops[:-1])
        hops.sort(key=lambda x: -abs(x[2]))
        heads_named.update((L, h) for L, h, _ in hops)
        links.append({"source": s, "target": t, "weight": w,
                      "heads": {"residual": residual, "one_hop": hops, "other_one_hop": other, "multi_hop": multi}})

    def trace(L, h, q, k, pairs, qm, km, q_const, k_const, edge=None):
        score = round(sum(a for _, _, a in pairs) + 0.25, 6)  # pairs_rest 0.25 by construction
        t = {"layer": L, "head": h, "query_pos": q, "key_pos": k, "score": score, "prob": 0.0,
             "pair_wise_contributors": [list(p) for p in pairs],
             "top_q_marginal_contributors": [list(m) for m in qm], "top_k_marginal_contributors": [list(m) for m in km],
             "q_constant": q_const, "k_constant": k_const, "pairs_rest": 0.25,
             "q_rest": score - sum(a for _, a in qm) - q_const, "k_rest": score - sum(a for _, a in km) - k_const}
        if edge:
            t["source"], t["target"] = edge
        heads_named.add((L, h))
        return t

    traces = [
        trace(1, 0, 5, 2, [("0_5_5", "0_12_2", 1.8), ("E_563_5", "0_777_2", 0.9), ("1_const_5", "0_12_2", -0.4),
                           ("0_5_5", "E_6451_2", 0.3), ("E_563_5", "1_const_2", 0.12)],
              [("0_5_5", 2.0), ("E_563_5", 0.8)], [("0_12_2", 1.6), ("0_777_2", 0.85), ("E_6451_2", 0.2)],
              q_const=-0.3, k_const=0.1, edge=("0_12_2", "2_40_5")),
        trace(2, 1, 4, 4, [("1_7_4", "0_30_4", 1.1), ("0_31_4", "E_7001_4", -0.35), ("2_const_4", "0_30_4", 0.2)],
              [("1_7_4", 1.2), ("0_31_4", -0.3)], [("0_30_4", 1.0), ("E_7001_4", -0.2)], q_const=0.15, k_const=0.05),
    ]
    patterns = {}
    for L, h in sorted(heads_named):
        pat = []
        for q in range(n_pos):
            w = [rng.random() ** 3 for _ in range(q + 1)]
            w[0] += 0.5  # the usual sink on <bos>
            z = sum(w)
            pat.append([round(x / z, 5) for x in w] + [0.0] * (n_pos - q - 1))
        patterns[(L, h)] = pat
    for t in traces:  # prob: the pattern's entry, pattern[q, k]
        t["prob"] = patterns[(t["layer"], t["head"])][t["query_pos"]][t["key_pos"]]
    by_id = {n["node_id"]: n for n in nodes}
    first = traces[0]
    by_id[first["target"]]["qk_tracing_results"] = {
        k: first[k] for k in ("pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors")}
    qk_only = {"0_777_2": _node("0_777_2", cantor(0, 777), 0, 2, "cross layer transcoder", influence=None,
                                activation=1.7, clerp="capital cities (qk only)")}
    for L, p in [(1, 2), (1, 5), (2, 4)]:
        qk_only[f"{L}_const_{p}"] = _node(f"{L}_const_{p}", 0, L, p, "bias", influence=None, clerp="")
    # relevance: the unpruned influence of each (layer, position); larger where the graph's nodes are
    rows = ["E"] + [str(L) for L in range(n_layers)]
    values = [[0.0] * n_pos for _ in rows]
    for n in nodes:
        if n["feature_type"] == "logit":
            continue
        r = 0 if n["layer"] == "E" else int(n["layer"]) + 1
        values[r][n["ctx_idx"]] += 0.08 + 0.3 * (1 - (n["influence"] or 0))
    values = [[round(v + rng.uniform(0, 0.04), 5) for v in row] for row in values]
    g = _graph("qk-synthetic", tokens, ids, nodes, links)
    g["metadata"]["prompt"] = "The capital of France is"
    g["relevance"] = {"rows": rows, "values": values}
    g["qk_traces"] = traces
    g["qk_only_nodes"] = qk_only
    # head_patterns: every query row (as the writer stores them for prompts up to 128 tokens),
    # except for head (2, 1): only its traced query and the last position (as for longer prompts)
    subset = {(2, 1): [4, n_pos - 1]}
    g["head_patterns"] = []
    for L, h in sorted(patterns):
        queries = subset.get((L, h), list(range(n_pos)))
        g["head_patterns"].append({"layer": L, "head": h, "queries": queries,
                                   "pattern": [patterns[(L, h)][q] for q in queries]})
    g["metadata"]["qk"] = {"edge": ["0_12_2", "2_40_5"], "cell": ["0", 4], "qk_only": "0_777_2",
                           "subset_head": [2, 1]}
    return g


def feature_page(index: int, tokens=("The", " capital", " of", " France")) -> dict:
    """A hand-written feature page (docs/interop.md, "Feature pages")."""
    ex = lambda acts, ind: {"tokens": list(tokens), "tokens_acts_list": acts,  # noqa: E731
                            "train_token_ind": ind, "is_repeated_datapoint": False}
    return {"index": index, "act_min": 0.0, "act_max": 4.0, "activation_frequency": 0.0123,
            "quantile_values": [0.5, 1.0, 4.0], "histogram": [1, 5, 9, 4, 2, 1],
            "top_logits": [" Paris", " Lyon", " France"], "bottom_logits": [" banana", " the"],
            "examples_quantiles": [
                {"quantile_name": "Top activations", "examples": [ex([0.0, 1.0, 0.5, 4.0], 3), ex([0.2, 3.0, 0.0, 0.0], 1)]},
                {"quantile_name": "Quantile 0.5", "examples": [ex([0.0, 0.3, 0.6, 0.0], 2)]}]}


def tiny_setup(per_cell: int = 2):
    """(ReplacementModel, graph JSON) for a tiny random Gemma 3 (4 layers, vocab 300).

    Nodes: every embedding, the ``per_cell`` most active features of each (layer, position)
    past ``<bos>``, one error node a layer, the 4 most likely next tokens. Links: each feature's
    edge from its own position's token and its edges into the 4 logits, read from the
    attribution graph (``attribute(..., targets=top)``), except the first feature's link to the
    top logit ("pruned")."""
    from cltrace import attribute

    rm = tiny_replacement("plt+skip", torch.float32, skip_positions=1)
    clean = rm.run(TOKENS)
    n_layers, last = 4, len(TOKENS) - 1
    tokens = [f"t{t}" for t in TOKENS]
    probs = torch.softmax(clean.logits[-1].double(), -1)
    top = probs.topk(4).indices.tolist()
    graph = attribute(TOKENS, rm, targets=top, max_feature_nodes=None)  # every active feature
    assert graph.logit_tokens.tolist() == top
    node = {tuple(r): i for i, r in enumerate(graph.features.tolist())}  # (layer, pos, f) -> node
    row = {int(t): r for r, t in enumerate(graph.edge_targets.tolist())}  # node -> its edge row

    def edge(target: int, source: int) -> float:
        return float(graph.edges[row[target], source])

    nodes, feats = embed_nodes(TOKENS, tokens), []
    for L in range(n_layers):
        a = clean.acts[L]
        for p in range(1, len(TOKENS)):
            lo, hi = int(a.row_offsets[p]), int(a.row_offsets[p + 1])
            pick = sorted(range(lo, hi), key=lambda k: -float(a.acts[k]))[:per_cell]
            for k in pick:
                f, act = int(a.feat_idx[k]), float(a.acts[k])
                assert float(graph.activations[node[(L, p, f)]]) == act
                feats.append((L, f, p, act))
        nodes.append(_node(f"{L}_-1_{last}", -1, L, last, "mlp reconstruction error", influence=0.7))
    for i, (L, f, p, act) in enumerate(feats):
        nodes.append(_node(f"{L}_{f}_{p}", cantor(L, f), L, p, "cross layer transcoder",
                           influence=0.05 + 0.7 * i / len(feats), activation=act))
    for t in top:
        nodes.append(_node(f"{n_layers + 1}_{t}_{last}", t, n_layers + 1, last, "logit",
                           clerp=f'Output "t{t}" (p={float(probs[t]):.3f})', prob=float(probs[t])))
    links = [{"source": f"E_{TOKENS[p]}_{p}", "target": f"{L}_{f}_{p}",
              "weight": edge(node[(L, p, f)], graph.token_start + p)} for (L, f, p, _) in feats]
    for j, (L, f, p, act) in enumerate(feats):
        for k, t in enumerate(top):
            if j == 0 and k == 0:
                continue  # "pruned": the viewer must say this link is missing
            links.append({"source": f"{L}_{f}_{p}", "target": f"{n_layers + 1}_{t}_{last}",
                          "weight": edge(graph.logit_start + k, node[(L, p, f)])})
    g = _graph("tiny", tokens, TOKENS, nodes, links)
    g["metadata"]["feats"] = len(feats)
    return rm, g


def watch_page(pg, origin: str) -> tuple[list, list]:
    """(errors, foreign): lists that fill with ``pg``'s JS errors (page errors and console
    errors; HTTP 4xx answers are not JS errors) and the URLs it requests outside ``origin``."""
    errors, foreign = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error"
          and not m.text.startswith("Failed to load resource") else None)
    pg.on("request", lambda r: None if r.url.startswith(origin + "/") or r.url.startswith(("data:", "about:"))
          else foreign.append(r.url))
    return errors, foreign


def launch_chromium(playwright):
    """The system Chromium, headless, fresh profile; returns (browser context, profile dir)."""
    profile = tempfile.mkdtemp(prefix="cltrace-chromium-")
    ctx = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1500, "height": 900},
                                                       bypass_csp=True)  # lets Playwright evaluate test code
    return ctx, profile


def browser_missing() -> str:
    """Why the browser tests cannot run here ("" when they can)."""
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return ""


def cleanup(profile):
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium context for a test module (import the fixture): skipped where the
    browser or Playwright is missing, failed under ``CI=true``."""
    why = browser_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run on CI: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        yield ctx
        ctx.close()
        cleanup(profile)


@contextlib.contextmanager
def serving(root, **kw):
    """``cltrace serve`` of the folder ``root`` on a free local port (``kw``: make_server's),
    in a thread: yields its base URL, then shuts it down."""
    from cltrace.serve import make_server, serve_in_thread

    srv = make_server(root, port=0, **kw)
    serve_in_thread(srv)
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def http_json(url: str, data=None) -> tuple[int, dict]:
    """(HTTP status, parsed JSON body) of a GET of ``url``, or with ``data`` a POST of it as
    JSON (error statuses returned, not raised)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
