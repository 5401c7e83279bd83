"""``cltrace attribute`` end to end on the real Gemma 3 270M (small transcoders built here)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from cltrace.cli import main

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """A 256-wide synthetic PLT set with skip for the 270M, in the Gemma Scope 2 layout."""
    from cltrace.models import load_model
    from cltrace.training.starter import collect_mlp_io, fit_starter_set
    from cltrace.transcoders.write import save_gemmascope

    loaded = load_model("gemma-3-270m")
    X, Y = collect_mlp_io(loaded.model, loaded.tokenizer, 256)
    ts = fit_starter_set(X, Y, width=256, l0=8, model_name="gemma-3-270m")
    return save_gemmascope(ts, tmp_path_factory.mktemp("tc") / "set", l0=8)


def test_attribute_writes_every_format(small_set, tmp_path, capsys):
    rc = main(["attribute", "The capital of France is", "--transcoders", str(small_set),
               "--out", str(tmp_path), "--max-feature-nodes", "48", "--batch-size", "16",
               "--format", "json,dot,svg,pt", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    slug = "the-capital-of-france-is"
    data = json.loads((tmp_path / f"{slug}.json").read_text())
    from cltrace.export import GRAPH_SCHEMA_PATH
    jsonschema.validate(data, json.loads(GRAPH_SCHEMA_PATH.read_text()))
    assert data["metadata"]["prompt"] == "The capital of France is"
    assert any(n["clerp"].startswith('Output " Paris"') for n in data["nodes"])
    assert (tmp_path / f"{slug}.dot").read_text().startswith("digraph")
    from cltrace.graph import Graph
    g = Graph.load(tmp_path / f"{slug}.graph.safetensors")
    assert g.n_features == 48 and g.n_logits == 10
    assert "scores: replacement" in out and "peak RSS" in out
    import shutil
    assert (tmp_path / f"{slug}.svg").exists() == bool(shutil.which("dot"))


def test_attribute_chat_and_targets(small_set, tmp_path, capsys):
    rc = main(["attribute", "Name a colour.", "--chat", "--transcoders", str(small_set),
               "--out", str(tmp_path), "--slug", "chat", "--max-feature-nodes", "16",
               "--target", " Blue", "--target-diff", " Red", " Blue", "--format", "pt", "--quiet"])
    assert rc == 0
    from cltrace.graph import Graph
    g = Graph.load(tmp_path / "chat.graph.safetensors")
    assert g.token_strs[1] == "<start_of_turn>" and g.settings["skip_positions"] == 4
    assert (g.features[:, 1] >= 4).all(), "no features on the chat-template prefix"
    assert g.logit_labels == [" Blue", "' Red' - ' Blue'"]


def test_attribute_bad_arguments_exit_with_a_message(small_set, tmp_path, capsys):
    rc = main(["attribute", "x", "--transcoders", str(small_set), "--out", str(tmp_path),
               "--node-threshold", "1.5", "--quiet"])
    assert rc == 2 and "--node-threshold must be in (0, 1]" in capsys.readouterr().err
    rc = main(["attribute", "x", "--transcoders", str(tmp_path / "missing"), "--quiet"])
    assert rc == 2 and "missing" in capsys.readouterr().err
    rc = main(["attribute", "x", "--transcoders", str(small_set), "--format", "gif", "--quiet"])
    assert rc == 2 and "--format" in capsys.readouterr().err


def test_graph_names_the_model_as_loaded(small_set, tmp_path):
    from cltrace.graph import Graph
    main(["attribute", "Hi", "--transcoders", str(small_set), "--out", str(tmp_path),
          "--max-feature-nodes", "4", "--format", "pt", "--quiet"])
    assert Graph.load(tmp_path / "hi.graph.safetensors").model_name == "gemma-3-270m"
