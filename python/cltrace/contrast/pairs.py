"""Minimal pairs of a contrast: prompts of the two sets matched by a shared ``pair`` id, and
the difference of their two pruned graphs on aligned positions.

Before tracing (:func:`check_pairs`, :func:`check_lengths`): every pair id has exactly one
prompt in set A and one in set B, and the two prompts have the same number of tokens (the
graphs are aligned position by position). Prompts without ``pair`` are not paired.

After tracing (:func:`pair_graph`): ``pair-{id}.json``, one graph JSON in the viewer's format
holding the union of the two pruned graphs. A node is keyed by

* a feature: (layer, feature index, position);  * an error node: (layer, position);
* a token (embedding): its position;  * a logit: its token id;

an edge by its two nodes' keys. Every node and edge carries the cltrace extension field
``pair`` (documented in docs/interop.md, "Pair difference graphs"):

* node ``pair``: ``{"in": "a" | "b" | "both", "value": NAME, "a": x or null, "b": y or null,
  "diff": y - x, "influence": [cumulative influence in A or null, in B or null]}``, where
  NAME is the quantity compared: ``activation`` for a feature, ``token_prob`` for a logit,
  ``out_weight`` (the sum of the weights of the node's edges in that prompt's pruned graph)
  for a token or an error node; null where that prompt's pruned graph lacks the node, and
  ``diff`` counts a missing value as 0.
* edge ``pair``: ``{"in": ..., "a": weight in A or null, "b": weight in B or null, "diff": b - a}``.

The difference is always B minus A (the second set's prompt minus the first's). The usual
fields (``activation``, ``influence``, ``token_prob``, ``weight``) hold A's value where A has
the node or edge, else B's, so the file reads as an ordinary graph in any viewer. Prompt
tokens that differ are shown as ``"a|b"`` (``metadata.prompt_tokens``, the token nodes'
labels). ``metadata.info.pair_diff`` names the pair, its sets, slugs and prompts, and counts
the nodes and links of each kind of carrier.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from ..errors import UsageError

FEATURE, ERROR, TOKEN, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"
CARRIERS = ("a", "b", "both")
DROPPED = ("relevance", "qk_traces", "head_patterns", "qk_only_nodes")  # per-prompt attention data: not merged


# --- before tracing ---------------------------------------------------------------------------

def check_pairs(names: list[str], sets: list[list]) -> list[tuple]:
    """[(pair id, spec in A, spec in B)] in order of first appearance in set A (then B), from
    the PromptSpecs' ``pair``; a UsageError naming the first pair id without exactly one prompt
    in each set. Empty when no prompt has a pair."""
    members: dict = {}  # id -> ([specs in A], [specs in B])
    for i, specs in enumerate(sets):
        for s in specs:
            if s.pair is not None:
                members.setdefault(s.pair, ([], []))[i].append(s)
    for pid, (a, b) in members.items():
        if len(a) != 1 or len(b) != 1:
            raise UsageError(f"pair {pid!r}: {len(a)} prompt(s) in set {names[0]!r} and {len(b)} in set "
                             f"{names[1]!r} (a pair needs exactly one prompt in each set)")
    return [(pid, a[0], b[0]) for pid, (a, b) in members.items()]


def n_tokens(tokenizer, spec) -> int:
    """How many tokens the replacement model runs on for ``spec`` (as tracing tokenizes it:
    :func:`cltrace.models.prompt_tokens`, a plain text through the tokenizer with <bos>)."""
    from ..models import prompt_tokens

    _, ids = prompt_tokens(tokenizer, spec.prompt, spec.chat, spec.messages)
    if isinstance(ids, str):
        ids = tokenizer(ids, return_tensors="pt")["input_ids"][0]
    return int(len(ids))


def check_lengths(pairs: list[tuple], count: Callable[[object], int]) -> None:
    """A UsageError naming the first pair whose two prompts differ in token count
    (``count(spec)``: :func:`n_tokens` with the model's tokenizer)."""
    for pid, a, b in pairs:
        na, nb = count(a), count(b)
        if na != nb:
            raise UsageError(f"pair {pid!r}: prompt {a.slug!r} has {na} tokens and {b.slug!r} has {nb} "
                             f"(the graphs of a pair are aligned position by position: give its "
                             f"prompts the same number of tokens)")


def pair_file(pid: str, taken: set) -> str:
    """``pair-{id}`` with the id made file-safe, ``-2``, ``-3`` ... when taken (added to ``taken``)."""
    base = "pair-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", str(pid)).strip("-.") or "x")
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


# --- after tracing ----------------------------------------------------------------------------

def node_key(node: dict) -> tuple:
    """The aligned key of a graph JSON node (see the module docstring)."""
    kind, pos = node.get("feature_type"), int(node.get("ctx_idx", 0))
    if kind == FEATURE:
        layer, feat = node["jsNodeId"].removesuffix("-0").split("_")
        return ("F", int(layer), int(feat), pos)
    if kind == ERROR:
        return ("R", int(node["layer"]), pos)
    if kind == TOKEN:
        return ("E", pos)
    return ("L", int(node["feature"]))


def _value_name(key: tuple) -> str:
    return {"F": "activation", "L": "token_prob"}.get(key[0], "out_weight")


def _index(g: dict) -> tuple[dict, dict, dict, dict]:
    """(key -> node, node id -> key, (source key, target key) -> weight, key -> out weight) of a graph JSON."""
    nodes, ids = {}, {}
    for n in g["nodes"]:
        k = node_key(n)
        nodes[k] = n
        ids[n["node_id"]] = k
    edges, out = {}, {}
    for link in g["links"]:
        s, t = ids.get(link["source"]), ids.get(link["target"])
        if s is None or t is None:
            continue
        w = float(link["weight"])
        edges[(s, t)] = w
        out[s] = out.get(s, 0.0) + w
    return nodes, ids, edges, out


def _value(node: Optional[dict], key: tuple, out: dict) -> Optional[float]:
    if node is None:
        return None
    name = _value_name(key)
    v = out.get(key, 0.0) if name == "out_weight" else node.get(name)
    return None if v is None else float(v)


def _carrier(a, b) -> str:
    return "both" if a is not None and b is not None else "a" if a is not None else "b"


def _diff(a: Optional[float], b: Optional[float]) -> float:
    return (b or 0.0) - (a or 0.0)


def merged_tokens(ta: list, tb: list) -> list[str]:
    """Each position's token, ``"a|b"`` where the two prompts differ."""
    return [x if x == y else f"{x}|{y}" for x, y in zip(ta, tb)]


def pair_graph(ga: dict, gb: dict, *, pair: str, name: str, sets: tuple, slugs: tuple) -> dict:
    """The difference graph JSON (slug ``name``) of the pruned graph JSONs ``ga`` (set A's
    prompt) and ``gb`` (set B's), by the module docstring; a ValueError when their prompts
    differ in length."""
    ta, tb = ga["metadata"].get("prompt_tokens", []), gb["metadata"].get("prompt_tokens", [])
    if len(ta) != len(tb):
        raise ValueError(f"the prompts of pair {pair!r} have {len(ta)} and {len(tb)} tokens: not aligned")
    tokens = merged_tokens(ta, tb)
    na, ida, ea, oa = _index(ga)
    nb, idb, eb, ob = _index(gb)
    keys = list(na) + [k for k in nb if k not in na]  # A's order, then B's other nodes
    new_id, nodes = {}, []
    counts = dict.fromkeys(CARRIERS, 0)
    for k in keys:
        a, b = na.get(k), nb.get(k)
        va, vb = _value(a, k, oa), _value(b, k, ob)
        node = dict(a if a is not None else b)
        carrier = _carrier(a, b)
        counts[carrier] += 1
        infl = [None if x is None else x.get("influence") for x in (a, b)]
        node["pair"] = {"in": carrier, "value": _value_name(k), "a": va, "b": vb, "diff": _diff(va, vb),
                        "influence": infl}
        if k[0] == "E":
            node["clerp"] = f'Emb: "{tokens[k[1]]}"'
        elif k[0] == "L" and carrier == "both":
            label = re.sub(r" \(p=[^)]*\)$", "", node.get("clerp", ""))
            node["clerp"] = f"{label} (p={va:.3f}|{vb:.3f})"
        new_id[k] = node["node_id"]
        nodes.append(node)
    links = []
    link_counts = dict.fromkeys(CARRIERS, 0)
    for e in list(ea) + [e for e in eb if e not in ea]:
        wa, wb = ea.get(e), eb.get(e)
        carrier = _carrier(wa, wb)
        link_counts[carrier] += 1
        links.append({"source": new_id[e[0]], "target": new_id[e[1]], "weight": wa if wa is not None else wb,
                      "pair": {"in": carrier, "a": wa, "b": wb, "diff": _diff(wa, wb)}})
    meta = ga["metadata"]
    info = {"pair": pair, "sets": list(sets), "slugs": list(slugs),
            "prompts": [ga["metadata"].get("prompt", ""), gb["metadata"].get("prompt", "")],
            "difference": "b - a", "nodes": counts, "links": link_counts}
    metadata = {**meta, "slug": name, "prompt_tokens": tokens,
                "prompt": f"{info['prompts'][0]} | {info['prompts'][1]}",
                "info": {**meta.get("info", {}), "pair_diff": info}}
    out = {k: v for k, v in ga.items() if k not in DROPPED}
    out.update(metadata=metadata, nodes=nodes, links=links)
    out["qParams"] = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return out
