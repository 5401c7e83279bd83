"""Neuronpedia JSON (schema, determinism, text survival, index) and Graphviz exports."""
from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

import cltrace

from cltrace.export import GRAPH_SCHEMA_PATH, render, to_dot, to_neuronpedia, write_neuronpedia
from cltrace.graph import prune
from graph_fixtures import random_graph

NASTY = ['"quoted"', "new\nline", "ünï 😀", "", "tab\t\\"]


@pytest.fixture
def graph():
    g = random_graph(n_layers=3, n_pos=5, n_features=40, token_strs=NASTY)
    g.prompt = "".join(NASTY)
    g.model_name, g.scan = "tiny-test", "tiny-test-plt"
    g.logit_labels = ['"x"', "\n", "ü"]
    g.settings = {"max_n_logits": 3, "batch_size": 8}
    return g


def test_json_validates_and_is_consistent(graph, tmp_path):
    path = write_neuronpedia(graph, tmp_path, "my-graph")
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(GRAPH_SCHEMA_PATH.read_text()))
    ids = {n["node_id"] for n in data["nodes"]}
    assert len(ids) == len(data["nodes"]), "node ids unique"
    assert all(l["source"] in ids and l["target"] in ids for l in data["links"])
    kinds = [n["feature_type"] for n in data["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == graph.n_logits
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    assert data["metadata"]["prompt_tokens"] == NASTY and data["metadata"]["prompt"] == graph.prompt
    assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.85}  # the defaults (PruneSettings)
    # Every link is an edge of the graph with its weight.
    dense, node_ids = graph.to_dense(), graph.node_ids()
    for l in data["links"][:50]:
        w = float(dense[node_ids.index(l["target"]), node_ids.index(l["source"])])
        assert l["weight"] == pytest.approx(w)
    errors = [n for n in data["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert all(n["node_id"].split("_")[1] == "-1" for n in errors)


def test_json_follows_the_reference_node_rules(graph, tmp_path):
    """circuit-tracer 0.5.0 (frontend/graph_models.py) and Neuronpedia under schema_version 1:
    a feature's `feature` is the Cantor pairing of (layer, feature index), embeddings carry
    their position, logits their vocabulary id; ids never collide; no machine path or URL."""
    from cltrace.export.neuronpedia import cantor_pair, cantor_unpair

    graph.transcoder_list = ["cltrace-starter/tiny"]
    data = to_neuronpedia(graph, "rules", labels={(int(l), int(f)): f"label {l}/{f}" for l, _, f in graph.features.tolist()})
    assert data["metadata"]["schema_version"] == 1
    assert data["metadata"]["info"]["generator"] == {"name": "cltrace", "version": cltrace.__version__}
    assert data["metadata"]["transcoder_list"] == ["cltrace-starter/tiny"]
    js = [n["jsNodeId"] for n in data["nodes"]]
    assert len(set(js)) == len(js) - sum(  # one jsNodeId per feature across positions
        1 for i, n in enumerate(data["nodes"]) if n["jsNodeId"] in js[:i])
    for n in data["nodes"]:
        kind, parts = n["feature_type"], n["node_id"].split("_")
        if kind == "cross layer transcoder":
            layer, feat, pos = map(int, parts)
            assert n["feature"] == (layer + feat) * (layer + feat + 1) // 2 + feat
            assert cantor_unpair(n["feature"]) == (layer, feat) and n["layer"] == str(layer)
            assert n["jsNodeId"] == f"{layer}_{feat}-0" and n["ctx_idx"] == pos
            assert n["clerp"] == f"label {layer}/{feat}" and n["activation"] > 0
        elif kind == "mlp reconstruction error":
            assert parts[1] == "-1" and n["feature"] == -1
        elif kind == "embedding":
            assert n["layer"] == "E" and n["feature"] == n["ctx_idx"] == int(parts[2])
            assert n["jsNodeId"] == f"E_{parts[1]}-{parts[2]}"
        else:
            assert n["layer"] == str(graph.n_layers + 1) and n["feature"] == int(parts[1])
            assert n["jsNodeId"] == f"L_{parts[1]}-{parts[2]}" and n["clerp"].startswith("Output ")
    assert [cantor_pair(*cantor_unpair(z)) for z in range(500)] == list(range(500))


def test_json_is_byte_identical_and_index_updates(graph, tmp_path):
    a = write_neuronpedia(graph, tmp_path / "a", "g1").read_bytes()
    b = write_neuronpedia(graph, tmp_path / "b", "g1").read_bytes()
    assert a == b
    write_neuronpedia(graph, tmp_path / "a", "g2", prune(graph, 0.5))
    write_neuronpedia(graph, tmp_path / "a", "g1", prune(graph, 0.6))
    index = json.loads((tmp_path / "a" / "graph-metadata.json").read_text())
    assert [(g["slug"], g["node_threshold"]) for g in index["graphs"]] == [("g1", 0.6), ("g2", 0.5)]
    with pytest.raises(ValueError, match="slug"):
        to_neuronpedia(graph, "a/b")


def test_dot_structure_and_render(graph, tmp_path):
    result = prune(graph)
    src = to_dot(graph, result=result).source
    assert "rankdir=BT" in src and "rank=same" in src and '"rank_-1" -> rank_0 [style=invis]' in src
    assert "#2166ac" in src or "#b2182b" in src
    assert "\\n" in src  # multi-line labels
    render(graph, tmp_path / "g.dot", fmt="dot", result=result)
    assert (tmp_path / "g.dot").read_text() == src
    if shutil.which("dot"):
        svg = render(graph, tmp_path / "g.svg", result=result).read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    with pytest.raises(ValueError, match="unknown format"):
        render(graph, tmp_path / "g.gif", fmt="gif")


def test_dot_is_capped_to_the_most_influential_nodes(graph):
    result = prune(graph, 1.0, 1.0)
    src = to_dot(graph, result=result, max_nodes=graph.n_pos + graph.n_logits + 3).source
    ids = graph.node_ids()
    drawn = [i for i in range(graph.token_start) if f'"{ids[i]}" [' in src or f"{ids[i]} [" in src]
    assert len(drawn) == 3
    best = sorted((i for i in range(graph.token_start) if result.node_mask[i]),
                  key=lambda i: -float(result.influence[i]))[:3]
    assert sorted(drawn) == sorted(best)
    assert "top" in src
    few = to_dot(graph, result=result, max_edges=5).source
    assert few.count("penwidth") == 5


def test_written_files_are_readable_by_others(graph, tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        path = write_neuronpedia(graph, tmp_path, "perm")
        graph.save(tmp_path / "g.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.safetensors").stat().st_mode) == 0o644


def test_render_without_dot_binary_says_what_to_install(graph, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        render(graph, tmp_path / "g.svg")
    assert not (tmp_path / "g.svg").exists()
