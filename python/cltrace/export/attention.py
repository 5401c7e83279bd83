"""The graph JSON's attention fields: head splits on links, QK traces, contributors, patterns.

The layout is docs/interop.md, "Attention". The input is an attention report
(:class:`cltrace.attention.explain.AttentionReport`, read by attribute: this stage sits below
the one that computes it); node ids are the graph's, and contributors the pruned graph does
not show are described in ``qk_only_nodes`` (Neuronpedia's key for them).
"""
from __future__ import annotations

from typing import Any, Callable


def _round(x: float) -> float:
    return float(f"{x:.7g}")


def link_heads(report, ids: list[str], n_listed: int) -> dict[tuple[str, str], dict[str, Any]]:
    """(target id, source id) -> the link's ``heads`` object: residual, the ``n_listed``
    largest one-hop heads, the other one-hop heads summed, multi-hop."""
    L = report.loadings
    out = {}
    n_heads = L.one_hop.shape[2]
    for e, (t, s) in enumerate(report.edges.tolist()):
        one = L.one_hop[e].flatten()
        order = one.abs().argsort(descending=True, stable=True)[:n_listed]
        order = order[one[order] != 0]
        listed = [[int(i) // n_heads, int(i) % n_heads, _round(float(one[i]))] for i in order]
        out[(ids[t], ids[s])] = {"residual": _round(float(L.residual[e])), "one_hop": listed,
                                 "other_one_hop": _round(float(one.sum() - one[order].sum())),
                                 "multi_hop": _round(float(L.multi_hop[e]))}
    return out


def const_id(layer: int, pos: int) -> str:
    """The id of the constants (``b_dec``, positions without nodes) in r_layer at ``pos``."""
    return f"{layer}_const_{pos}"


def contributor_id(c, ids: list[str]) -> str:
    """A QK contributor's node id: its graph node's, or built the same way."""
    if c.node >= 0:
        return ids[c.node]
    if c.kind == "const":
        return const_id(c.layer, c.pos)
    return f"{c.layer}_{c.feature}_{c.pos}"  # a feature the graph did not visit


def qk_fields(report, ids: list[str], shown: set[str],
              describe: Callable[[int], dict], describe_feature: Callable[[Any], dict]) -> dict[str, Any]:
    """The top-level ``qk_traces``, ``qk_only_nodes`` and ``head_patterns``, and per node id
    its Neuronpedia ``qk_tracing_results`` (under ``"by_node"``). ``shown``: the ids among
    ``nodes``; ``describe(node)``: a graph node's JSON object; ``describe_feature(c)``: the
    object of a feature contributor the graph does not hold."""
    traces, only, by_node = [], {}, {}

    def name(layer: int, col: int, pos: int) -> str:
        c = report.contributors.get((layer, col)) or report.contributors[(layer, col, pos)]
        cid = contributor_id(c, ids)
        if cid not in shown and cid not in only:
            if c.node >= 0:
                only[cid] = describe(c.node)
            elif c.kind == "const":
                only[cid] = {"node_id": cid, "feature": None, "layer": str(c.layer), "ctx_idx": c.pos,
                             "feature_type": "bias", "jsNodeId": cid, "influence": None, "activation": None,
                             "token_prob": 0.0, "is_target_logit": False,
                             "clerp": f"constants into layer {c.layer}: b_dec, positions without nodes"}
            else:
                only[cid] = describe_feature(c)
        return cid

    for tr, edge in zip(report.traces, report.trace_edges):
        L, q, k = tr.layer, tr.query_pos, tr.key_pos
        results = {
            "pair_wise_contributors": [[name(L, i, q), name(L, j, k), _round(v)] for i, j, v in tr.pairs],
            "top_q_marginal_contributors": [[name(L, i, q), _round(v)] for i, v in tr.q_marginals],
            "top_k_marginal_contributors": [[name(L, j, k), _round(v)] for j, v in tr.k_marginals],
        }
        entry = {"layer": L, "head": tr.head, "query_pos": q, "key_pos": k,
                 "score": _round(tr.score), "prob": _round(tr.prob)}
        if edge is not None:
            entry.update(target=ids[edge[0]], source=ids[edge[1]])
            by_node.setdefault(ids[edge[0]], results)
        entry.update(results)
        entry.update({key: _round(getattr(tr, key)) for key in
                      ("q_constant", "k_constant", "pairs_rest", "q_rest", "k_rest")})
        traces.append(entry)
    patterns = [{"layer": L, "head": h, "queries": q.tolist(),
                 "pattern": [[round(float(x), 5) for x in row] for row in P.tolist()]}
                for (L, h), (q, P) in sorted(report.patterns.items())]
    return {"qk_traces": traces, "qk_only_nodes": only, "head_patterns": patterns, "by_node": by_node}
