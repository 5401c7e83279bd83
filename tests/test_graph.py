"""Graph container: node table and ids, dense form, storage round trip, networkx."""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.graph import Graph, NodeKind
from cltrace.graph import prune
from support.graphs import random_graph


def test_node_table_and_ids():
    g = random_graph(n_layers=2, n_pos=3, n_features=4, n_logits=2)
    t, ids = g.nodes(), g.node_ids()
    assert len(ids) == g.n_nodes == 4 + 3 * 3 + 2 == len(set(ids)), "ids must be unique"
    assert t.kind.tolist() == [0] * 4 + [1] * 6 + [2] * 3 + [3] * 2
    l, p, f = g.features[0].tolist()
    assert ids[0] == f"{l}_{f}_{p}"
    assert ids[g.error_node(1, 2)] == "1_-1_2" and t.layer[g.error_node(1, 2)] == 1
    assert ids[g.token_start] == "E_100_0" and t.token_id[g.token_start] == 100
    assert ids[g.logit_start] == "3_7_2" and t.kind[g.logit_start] == NodeKind.LOGIT
    assert t.activation[g.logit_start] == pytest.approx(float(g.logit_probs[0]))


def test_dense_form_rows_are_targets():
    g = random_graph()
    d = g.to_dense()
    assert d.shape == (g.n_nodes, g.n_nodes)
    assert torch.equal(d[g.edge_targets], g.edges)
    assert (d[g.error_start:g.logit_start] == 0).all(), "errors and tokens have no inputs"


def test_save_load_round_trip(tmp_path):
    g = random_graph(token_strs=['"quoted"', "new\nline", "ünï 😀", "", "\\"])
    g.settings = {"batch_size": 4}
    g.info = {"transcoders": "synthetic"}
    g.save(tmp_path / "g.safetensors")
    h = Graph.load(tmp_path / "g.safetensors")
    assert h.token_strs == g.token_strs and h.settings == g.settings and h.info == g.info
    for k, v in g._tensors().items():
        assert torch.equal(getattr(h, k), v), k
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temp files left"
    (tmp_path / "g.safetensors.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="not a cltrace graph"):
        Graph.load(tmp_path / "g.safetensors")
    with pytest.raises(FileNotFoundError, match="missing"):
        Graph.load(tmp_path / "nope.safetensors")


def test_to_networkx_full_and_pruned():
    g = random_graph()
    full = g.to_networkx()
    assert full.number_of_nodes() == g.n_nodes
    assert full.number_of_edges() == int((g.edges != 0).sum())
    r = prune(g)
    small = g.to_networkx(r)
    assert small.number_of_nodes() == int(r.node_mask.sum())
    src, dst, w = next(iter(small.edges(data="weight")))
    ids = g.node_ids()
    assert w == pytest.approx(float(g.to_dense()[ids.index(dst), ids.index(src)]))
    assert small.nodes[ids[g.logit_start]]["kind"] == "logit"


def test_save_load_round_trips_any_token_text(tmp_path):
    """Graph.save writes its sidecar as ASCII JSON: tokens that are not valid UTF-8 on their own
    (a lone surrogate, as a byte-level tokenizer can decode) come back as they were."""
    g = random_graph(token_strs=["<bos>", "\ud800x", "é", "\n", "😀"])
    g.save(tmp_path / "g.safetensors")
    back = Graph.load(tmp_path / "g.safetensors")
    assert back.token_strs == g.token_strs and torch.equal(back.edges, g.edges)
