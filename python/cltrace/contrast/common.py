"""The common circuit of a set of prompts: one merged graph JSON the viewer opens.

Prompts differ in length, so positions are counted from the end (the last token, where the
targets are read, is position 0 from the end). A node of a prompt's pruned graph is keyed by

* a feature: (layer, index, position from the end);
* an error node: (layer, position from the end); a token: (position from the end);
* a logit: its rank among the graph's logits (the first is the prompt's target).

A node (an edge: its pair of keys) is kept when at least ``min_share`` of the set's graphs
hold it; the merged node carries the mean of its influence and activation, the merged edge
the mean of its weight, over the graphs that hold it. Token labels: the token when every
graph that reaches that position has the same one, else "·".
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

FEATURE, ERROR, TOKEN, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"


def _key(node: dict, n_pos: int, logit_rank: int) -> tuple:
    kind, back = node.get("feature_type"), n_pos - 1 - int(node.get("ctx_idx", 0))
    if kind == FEATURE:
        layer, feat = node["jsNodeId"].removesuffix("-0").split("_")
        return ("F", int(layer), int(feat), back)
    if kind == ERROR:
        return ("R", int(node["layer"]), back)
    if kind == TOKEN:
        return ("E", back)
    return ("L", logit_rank)


class CommonCircuit:
    """The merge of a set's graphs, one graph at a time (:meth:`add`), then :meth:`graph`."""

    def __init__(self):
        self.nodes: dict = {}  # key -> [count, sum influence, sum activation, first node, sum token prob]
        self.edges: dict = {}  # (source key, target key) -> [count, sum weight]
        self.tokens: dict = {}  # position from the end -> set of token strings
        self.labels: dict = {}  # logit rank -> set of labels
        self.n, self.meta, self.n_layers = 0, None, 0

    def add(self, g: dict) -> None:
        """Count one prompt's graph JSON."""
        self.n += 1
        self.meta = self.meta or g.get("metadata", {})
        toks = g.get("metadata", {}).get("prompt_tokens", [])
        n_pos = len(toks) or 1 + max((int(x.get("ctx_idx", 0)) for x in g["nodes"]), default=0)
        for i, t in enumerate(toks):
            self.tokens.setdefault(n_pos - 1 - i, set()).add(t)
        ids, rank = {}, 0
        for node in g["nodes"]:
            k = _key(node, n_pos, rank)
            if k[0] == "L":
                rank += 1
                self.labels.setdefault(k[1], set()).add(node.get("clerp", "").split(" (p=")[0])
                self.n_layers = max(self.n_layers, int(node["layer"]))
            ids[node["node_id"]] = k
            e = self.nodes.setdefault(k, [0, 0.0, 0.0, node, 0.0])
            e[0] += 1
            e[1] += float(node.get("influence") or 0.0)
            e[2] += float(node.get("activation") or 0.0)
            e[4] += float(node.get("token_prob") or 0.0)
        for link in g["links"]:
            s, t = ids.get(link["source"]), ids.get(link["target"])
            if s is not None and t is not None:
                e = self.edges.setdefault((s, t), [0, 0.0])
                e[0] += 1
                e[1] += float(link["weight"])

    def graph(self, name: str, min_share: float) -> Optional[dict]:
        """The merged graph JSON (slug ``name``), or None without graphs."""
        n, meta, n_layers, tokens, labels = self.n, self.meta, self.n_layers, self.tokens, self.labels
        if not n:
            return None
        need = max(1, math.ceil(min_share * n - 1e-9))
        width = 1 + max(tokens, default=0)
        pos = lambda back: width - 1 - back  # noqa: E731
        out_nodes, new_id = [], {}
        for k, (c, infl, act, node, prob) in sorted(self.nodes.items(), key=lambda kv: str(kv[0])):
            if c < need:
                continue
            nid = {"F": lambda: f"{k[1]}_{k[2]}_{pos(k[3])}", "R": lambda: f"{k[1]}_-1_{pos(k[2])}",
                   "E": lambda: f"E_{pos(k[1])}_{pos(k[1])}", "L": lambda: f"{n_layers}_{k[1]}_{width - 1}"}[k[0]]()
            new_id[k] = nid
            m = dict(node, node_id=nid, influence=infl / c, ctx_idx=pos(k[-1]) if k[0] != "L" else width - 1)
            if node.get("activation") is not None:
                m["activation"] = act / c
            if k[0] == "E":
                m.update(jsNodeId=f"E_{pos(k[1])}-{pos(k[1])}", feature=pos(k[1]),
                         clerp=f"Emb: position -{k[1]} ({c}/{n})")
            elif k[0] == "R":
                m["jsNodeId"] = f"{k[1]}_-1_{pos(k[2])}-0"
            elif k[0] == "L":
                m.update(jsNodeId=f"L_{k[1]}-{width - 1}", feature=k[1], token_prob=prob / c, influence=None,
                         is_target_logit=k[1] == 0,
                         clerp=f"Output #{k[1] + 1}: " + " / ".join(sorted(labels[k[1]]))[:80] + f" ({c}/{n})")
            out_nodes.append(m)
        links = [{"source": new_id[s], "target": new_id[t], "weight": w / c}
                 for (s, t), (c, w) in sorted(self.edges.items(), key=lambda kv: str(kv[0]))
                 if c >= need and s in new_id and t in new_id]
        words = [next(iter(tokens[b])) if len(tokens.get(b, ())) == 1 else "·" for b in range(width - 1, -1, -1)]
        metadata = {**meta, "slug": name, "prompt_tokens": words,
                    "prompt": f"common circuit of {n} prompts (in >= {need} of them)",
                    "info": {**meta.get("info", {}), "common_circuit": {"prompts": n, "min_share": min_share,
                                                                        "min_count": need}}}
        return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                                                 "clickedId": "", "sg_pos": ""},
                "nodes": out_nodes, "links": links}


def common_circuit(graphs: Iterable[dict], name: str, min_share: float) -> Optional[dict]:
    """The merged graph JSON (slug ``name``) of ``graphs`` (each a prompt's graph JSON), or
    None without graphs."""
    acc = CommonCircuit()
    for g in graphs:
        acc.add(g)
    return acc.graph(name, min_share)
