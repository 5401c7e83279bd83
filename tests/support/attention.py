"""Brute-force oracles for the attention decompositions (cltrace.attention), shared by the text
and image tests (tests/test_attention.py, tests/test_qk_images.py):

* :func:`source_write` / :func:`stream_of` — one source (a column of EdgeRows) alone, and the
  residual stream it gives through the frozen model run forward;
* :func:`with_heads` / :func:`edge_by_forward` — the frozen model with some heads' patterns
  zeroed, and an edge as the target's read of a forward from one source;
* :func:`check_attention_json` — a graph JSON's attention fields against the schema and their
  own sums and references (docs/interop.md, "Attention").
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from cltrace.frozen.attention import as_dense
from cltrace.frozen.model import Seeds


def rel(a, b) -> float:
    """|a - b| / |b| (|b| floored at 1e-12)."""
    return abs(float(a) - float(b)) / max(1e-12, abs(float(b)))


def stream_of(fz, layer: int, embed, sources):
    """r_layer [n_pos, d] of the frozen model from ``embed`` and MLP-output ``sources``."""
    r = embed[:, None].clone()
    if layer == 0:
        return r[:, 0]
    return fz.run_layers(r, lambda L, x: sources[L][:, None], stop=layer)[:, 0]


def source_write(state, rows, col: int):
    """(embed [n, d], sources [n_layers, n, d]) of the one source in column ``col`` of ``rows``
    (an EdgeRows): a token's embedding (an image prompt's soft-token vector), an error vector,
    or an active feature's decoder rows times its activation."""
    fz, tcs = state.frozen, state.transcoders
    n, d = state.n_pos, fz.d_model
    embed = torch.zeros(n, d, dtype=fz.dtype)
    src = torch.zeros(fz.n_layers, n, d, dtype=fz.dtype)
    if col >= rows.token_start:
        p = col - rows.token_start
        embed[p] = state.embed[p]
    elif col >= rows.error_start:
        L, p = divmod(col - rows.error_start, n)
        src[L, p] = state.errors[L, p]
    else:
        af = state.active_features()
        S, p, f, a = (int(af.layer[col]), int(af.pos[col]), int(af.feature[col]), af.value[col])
        for L in range(S, fz.n_layers):
            if S in tcs.sources_writing_to(L):
                src[L, p] += a * tcs.decoder_slice(S, L)[f]
    return embed, src


def with_heads(fz, keep):
    """A copy of the frozen model whose patterns keep only the heads ``keep(L, h)``."""
    out = copy.copy(fz)
    out.layers = []
    for L, fl in enumerate(fz.layers):
        mask = torch.tensor([float(keep(L, h)) for h in range(fz.n_heads)], dtype=fz.dtype)
        out.layers.append(dataclasses.replace(fl, pattern=as_dense(fl.pattern) * mask[:, None, None]))
    return out


def edge_by_forward(fz, embed, src, target: Seeds) -> float:
    """The target's read of the frozen model's forward from ``embed``, ``src`` alone."""
    out = fz.forward(embed, src)
    L, p, v = int(target.layer[0]), int(target.pos[0]), target.vec[0]
    if L == fz.n_layers:
        return float(v @ fz.k_final(out.resid_final)[p])
    return float(v @ out.mlp_in[L, p])


def check_attention_json(data: dict) -> None:
    """The JSON's attention fields say what docs/interop.md says: schema, sums, references."""
    import jsonschema

    from cltrace.export import GRAPH_SCHEMA_PATH

    jsonschema.validate(data, json.loads(GRAPH_SCHEMA_PATH.read_text()))
    ids = {n["node_id"] for n in data["nodes"]}
    only = data["qk_only_nodes"]
    assert not ids & set(only)
    split = [link for link in data["links"] if "heads" in link]
    assert split and len(split) == len(data["links"])
    for link in split:
        h = link["heads"]
        total = h["residual"] + sum(w for *_, w in h["one_hop"]) + h["other_one_hop"] + h["multi_hop"]
        assert total == pytest.approx(link["weight"], rel=1e-4, abs=1e-5)
    assert data["qk_traces"]
    for tr in data["qk_traces"]:
        pairs, qm, km = (tr[k] for k in ("pair_wise_contributors", "top_q_marginal_contributors",
                                         "top_k_marginal_contributors"))
        assert sum(v for *_, v in pairs) + tr["pairs_rest"] == pytest.approx(tr["score"], rel=1e-4, abs=1e-5)
        assert sum(v for _, v in qm) + tr["q_rest"] + tr["q_constant"] == pytest.approx(tr["score"], rel=1e-4, abs=1e-5)
        assert sum(v for _, v in km) + tr["k_rest"] + tr["k_constant"] == pytest.approx(tr["score"], rel=1e-4, abs=1e-5)
        for ref in [i for i, _, _ in pairs] + [j for _, j, _ in pairs] + [i for i, _ in qm + km]:
            assert ref in ids or ref in only, ref
        if "target" in tr:
            node = next(n for n in data["nodes"] if n["node_id"] == tr["target"])
            assert "qk_tracing_results" in node
    n = len(data["metadata"]["prompt_tokens"])
    relevance = data["relevance"]
    assert len(relevance["rows"]) == len(relevance["values"]) and all(len(r) == n for r in relevance["values"])
    for hp in data["head_patterns"]:
        assert len(hp["pattern"]) == len(hp["queries"]) and all(len(r) == n for r in hp["pattern"])
