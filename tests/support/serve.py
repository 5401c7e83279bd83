"""Fixtures for the viewer tests: graph JSONs, a feature page, a headless Chromium.

* :func:`tiny_setup` — a tiny random Gemma 3 with calibrated transcoders, and a graph JSON of
  it whose token → feature and feature → logit link weights are the edges ``A[t, s]`` of
  :func:`cltrace.attribute` (the real attribution, every active feature visited), one of them
  left out as if pruned. The viewer's "edges predict the change" check then compares the
  attribution with an intervention (frozen mode, other features held:
  ``Δ(centred logit_t) = A[t, s] / a_s · Δa_s``), two independent computations.
* :func:`synthetic_graph` — a graph JSON of any size (the big-graph test: ~1,200 nodes,
  ~300k links), valid node ids, Cantor-paired ``feature`` fields (schema_version 1).
* :func:`feature_page` — a hand-written feature page in the format of docs/interop.md.
* :func:`launch_chromium` — Playwright driving the system Chromium (no download).
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile

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
