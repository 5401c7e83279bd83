"""The command line: every subcommand end to end, and every bad input a clear one-line error.

Bad input ends with exit status 2, one line on stderr naming the file, layer or argument, no
traceback, and no output files. The real Gemma 3 270M (session fixture ``real_gemma``) backs
the ``attribute``/``steer`` runs marked ``real_model``; a tiny random Gemma 3 the fast ones.
"""
from __future__ import annotations

import json
import os
import shutil

import jsonschema
import pytest
import torch

from cltrace.cli import main
from cltrace.steering import Intervention
from support import layouts as S
from support.cli import one_line_error
from support.tiny_gemma import tiny_replacement, use_tiny_model
from support.transcoders import random_transcoders


def test_inspect_cli(tmp_path, capsys):
    ts = random_transcoders("clt", n_layers=3, skip=True, seed=17)
    folder = S.write_gemmascope_clt(tmp_path / "clt", ts)
    assert main(["inspect", str(folder), "--per-layer"]) == 0
    out = capsys.readouterr().out
    for text in ("CLT (cross-layer transcoder)", "gemmascope_clt", "layers:     3 of 3: 0-2",
                 "d_model:    16", "32 features", "W_skip [16, 16]", "float32", "0-2",
                 "10 (config)"):
        assert text in out, (text, out)
    assert main(["inspect", str(folder), "--json", "--layers", "1-2", "--verify", "all"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1, 2] and summary["kind"] == "clt" and summary["skip"]
    assert summary["bytes"] == sum(os.path.getsize(folder / f"params_layer_{i}.safetensors")
                                   for i in (1, 2))
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "neither a local folder" in capsys.readouterr().err


def test_inspect_cli_checks_the_model(tmp_path, capsys):
    from transformers import Gemma3TextConfig

    folder = S.write_gemmascope_plt(tmp_path / "plt", random_transcoders("plt", n_layers=2, seed=18))
    Gemma3TextConfig(hidden_size=64, num_hidden_layers=2).save_pretrained(tmp_path / "model")
    assert main(["inspect", str(folder), "--model", str(tmp_path / "model")]) == 2
    assert "d_model 16 but the model" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small" in out
    assert "--verify" in out


@pytest.fixture
def tiny_cli(monkeypatch):
    rm = tiny_replacement("clt", dtype=torch.float32)
    use_tiny_model(monkeypatch, rm)
    return rm


def test_steer_cli(tiny_cli, capsys):
    from cltrace.cli import main

    assert main(["steer", "hello world", "--feature", "2:3=50", "-f", "0:5@-1*2", "-f", "1:7@2:5+1.5",
                 "--max-new-tokens", "4", "--top-k", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2:3=50, 0:5@-1*2, 1:7@2:5+1.5" in out and "free mode" in out
    assert "before" in out and "after" in out and out.count(" p=") == 6
    assert "generated before: " in out and "generated after: " in out
    assert main(["steer", "hello", "-f", "3:1=0", "--mode", "frozen", "--max-new-tokens", "0",
                 "--quiet"]) == 0
    assert "generated" not in capsys.readouterr().out
    # errors a user can act on
    assert main(["steer", "hello", "-f", "9:1=0", "--quiet"]) == 2
    assert "layer 9" in capsys.readouterr().err
    assert main(["steer", "hello", "-f", "1:1@40=0", "--quiet"]) == 2
    assert "pos 40" in capsys.readouterr().err
    for bad, msg in [("1:2=nan", "set must be a finite"), ("1:2", "expected LAYER:FEATURE"),
                     ("1:2@x=1", "position 'x'"), ("1:2*abc", "not a number")]:
        with pytest.raises(SystemExit):
            main(["steer", "hello", "-f", bad])
        assert msg in capsys.readouterr().err


def test_parse_feature():
    from cltrace.commands.steer import parse_feature

    assert parse_feature("8:1234@-1=0") == Intervention(8, 1234, pos=-1, set=0.0)
    assert parse_feature("3:7*0.5") == Intervention(3, 7, scale=0.5)
    assert parse_feature("3:7@:4+-2") == Intervention(3, 7, pos=slice(None, 4), add=-2.0)
    assert parse_feature("3:7@2:=1").pos == slice(2, None)


# --- prompts, output folders: checked before any work --------------------------------------

def test_prompt_file_and_stdin(tiny_cli, tmp_path, capsys, monkeypatch):
    import io

    (tmp_path / "p.txt").write_text("hello world")
    assert main(["steer", "--prompt-file", str(tmp_path / "p.txt"), "-f", "2:3=0",
                 "--max-new-tokens", "0", "--quiet"]) == 0
    assert "'hello world'" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    assert main(["steer", "--prompt-file", "-", "-f", "2:3=0", "--max-new-tokens", "0", "--quiet"]) == 0
    assert "'from stdin'" in capsys.readouterr().out
    long = "word " * 40_000  # over the 128 KiB limit of one command-line argument
    (tmp_path / "long.txt").write_text(long)
    out = tmp_path / "out"
    assert main(["attribute", "--prompt-file", str(tmp_path / "long.txt"), "--out", str(out),
                 "--quiet"]) == 2
    one_line_error(capsys, "tokens", "at most")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args,needles", [
    (["--prompt-file", "{tmp}/missing.txt"], ["--prompt-file", "missing.txt"]),
    (["--prompt-file", "{tmp}/bin.dat"], ["bin.dat", "binary"]),
    (["--prompt-file", "{tmp}/empty.txt"], ["the prompt is empty", "empty.txt"]),
    (["x", "--prompt-file", "{tmp}/empty.txt"], ["either as PROMPT or with --prompt-file"]),
    ([], ["either as PROMPT or with --prompt-file"]),
    (["   "], ["the prompt is empty"]),
    (["x", "--out", "/proc/cltrace-out"], ["--out /proc/cltrace-out", "cannot write"]),
    (["x", "--slug", "a/b"], ["--slug"]),
    (["x", "--max-feature-nodes", "-1"], ["--max-feature-nodes"]),
    (["x", "--edge-threshold", "0"], ["--edge-threshold must be in (0, 1]"]),
    (["x", "--format", "gif"], ["--format"]),
])
def test_attribute_bad_input_before_any_work(args, needles, tmp_path, capsys, monkeypatch):
    """Caught before the model is even loaded: nothing written, exit 2, one line."""
    import cltrace.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cltrace.models, "load_model", no_load)
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_text("  \n")
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    assert main(["attribute", *argv, "--quiet"]) == 2
    one_line_error(capsys, *needles)
    assert not out.exists() or list(out.iterdir()) == []


# --- the real Gemma 3 270M ----------------------------------------------------------------

@pytest.fixture
def real_cli(real_gemma, monkeypatch):
    """The CLI on the session's Gemma 3 270M (load_model itself is tested in test_models)."""
    import cltrace.models

    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: real_gemma)
    return real_gemma


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, real_gemma):
    """A 256-wide synthetic PLT set with skip for the 270M, in the Gemma Scope 2 layout."""
    from cltrace.training.starter import collect_mlp_io, fit_starter_set
    from cltrace.transcoders.write import save_gemmascope

    X, Y = collect_mlp_io(real_gemma.model, real_gemma.tokenizer, 256)
    ts = fit_starter_set(X, Y, width=256, l0=8, model_name="gemma-3-270m")
    return save_gemmascope(ts, tmp_path_factory.mktemp("tc") / "set", l0=8)


@pytest.mark.real_model
def test_attribute_writes_every_format(real_cli, small_set, tmp_path, capsys):
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
    assert data["metadata"]["transcoder_list"] == [small_set.name]  # a name, not a path
    assert any(n["clerp"].startswith('Output " Paris"') for n in data["nodes"])
    # <bos> (position 0) has no features and no error node, as in circuit-tracer
    assert all(n["ctx_idx"] > 0 for n in data["nodes"] if n["feature_type"] != "embedding")
    assert (tmp_path / f"{slug}.dot").read_text().startswith("digraph")
    from cltrace.graph import Graph
    g = Graph.load(tmp_path / f"{slug}.graph.safetensors")
    assert g.n_features == 48 and g.n_logits == 10 and g.settings["skip_positions"] == 1
    assert (g.features[:, 1] >= 1).all()
    bos_errors = [g.error_node(L, 0) for L in range(g.n_layers)]
    assert (g.edges[:, bos_errors] == 0).all()
    assert "scores: replacement" in out and "peak RSS" in out
    # the SVG is drawn in pure Python (cltrace.export.svg): written whether or not Graphviz is here
    svg = (tmp_path / f"{slug}.svg").read_text()
    assert svg.lstrip().startswith(("<svg", "<?xml")) and svg.rstrip().endswith("</svg>")


@pytest.mark.real_model
def test_attribute_chat_and_targets(real_cli, small_set, tmp_path, capsys):
    rc = main(["attribute", "Name a colour.", "--chat", "--transcoders", str(small_set),
               "--out", str(tmp_path), "--slug", "chat", "--max-feature-nodes", "16",
               "--target", " Blue", "--target-diff", " Red", " Blue", "--format", "pt", "--quiet"])
    assert rc == 0
    from cltrace.graph import Graph
    g = Graph.load(tmp_path / "chat.graph.safetensors")
    assert g.token_strs[1] == "<start_of_turn>" and g.settings["skip_positions"] == 4
    assert (g.features[:, 1] >= 4).all(), "no features on the chat-template prefix"
    assert g.logit_labels == [" Blue", "' Red' - ' Blue'"]


@pytest.mark.real_model
def test_steer_chat_on_the_base_tokenizer(real_cli, small_set, capsys):
    """The embedded base model has no chat template: --chat uses Gemma's turn format, as
    attribute does (one helper for both)."""
    assert getattr(real_cli.tokenizer, "chat_template", None) in (None, "")
    assert main(["steer", "Name a colour.", "--chat", "--transcoders", str(small_set),
                 "-f", "5:1=0", "--max-new-tokens", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert repr("<start_of_turn>user\nName a colour.<end_of_turn>")[1:-1] in out
    assert "generated after" in out


@pytest.mark.real_model
def test_attribute_bad_transcoders(real_cli, small_set, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["attribute", "x", "--transcoders", str(tmp_path / "missing"), "--out", str(out), "--quiet"])
    assert rc == 2
    one_line_error(capsys, "missing")
    # NaN in the decoder rows of one layer: found where they are read, named by file and layer
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-set"
    shutil.copytree(small_set, bad)
    layer_dir = next(p for p in bad.iterdir() if p.name.startswith("layer_5_"))
    params = load_file(layer_dir / "params.safetensors")
    params["w_dec"][:] = float("nan")
    save_file(params, layer_dir / "params.safetensors")
    rc = main(["attribute", "The capital of France is", "--transcoders", str(bad), "--out", str(out),
               "--quiet"])
    assert rc == 2
    one_line_error(capsys, str(layer_dir / "params.safetensors"), "layer 5", "W_dec rows", "NaN")
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.real_model
def test_graph_names_the_model_as_loaded(real_cli, small_set, tmp_path):
    from cltrace.graph import Graph
    main(["attribute", "Hi", "--transcoders", str(small_set), "--out", str(tmp_path),
          "--max-feature-nodes", "4", "--format", "pt", "--quiet"])
    assert Graph.load(tmp_path / "hi.graph.safetensors").model_name == "gemma-3-270m"


def test_console_script_ends_through_exit_quickly(tmp_path):
    # the installed `cltrace` is console_main: main(), then gc.freeze() so that interpreter
    # shutdown does not traverse torch's objects (benchmarks/RESULTS_attribution.md)
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["cltrace"] == "cltrace.cli:console_main"
    code = ("import gc, sys; from cltrace.cli import console_main; c = console_main(); "
            "print('frozen', gc.get_freeze_count() > 0); sys.exit(c)")
    p = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "missing")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 2 and p.stdout.strip() == "frozen True"
    assert p.stderr.count("\n") == 1 and "transcoders not found" in p.stderr
