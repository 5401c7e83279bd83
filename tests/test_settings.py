"""One source for every default: the command-line options are made from the settings
dataclasses, and the files a job writes say what was done."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cltrace.attribution import AttributionSettings
from cltrace.cli import build_parser
from cltrace.commands.attribute import trace_settings
from cltrace.graph import PruneSettings, prune
from cltrace.pipeline import PromptSpec, TraceSettings, trace_prompt
from cltrace.settings import from_args
from cltrace.training import TrainConfig


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", ["attribute", "batch"])
def test_trace_options_default_to_the_settings(command):
    s = trace_settings(parse(command, "x"))
    assert s.attribution == AttributionSettings() and s.pruning == PruneSettings()
    assert PruneSettings().edge_threshold == 0.85  # Neuronpedia's, as the README says
    assert prune.__defaults__ == (PruneSettings.node_threshold, PruneSettings.edge_threshold)


def test_trace_options_reach_the_settings():
    s = trace_settings(parse("attribute", "x", "--max-feature-nodes", "all", "--batch-size", "7",
                             "--max-n-logits", "3", "--desired-logit-prob", "0.5",
                             "--node-threshold", "0.6", "--edge-threshold", "0.7",
                             "--format", "json,pt"))
    assert s == TraceSettings(AttributionSettings(None, 7, 3, 0.5), PruneSettings(0.6, 0.7),
                              ("json", "pt"))


def test_train_options_are_the_train_config():
    assert from_args(TrainConfig, parse("train", "--out", "x")) == TrainConfig()
    cfg = from_args(TrainConfig, parse("train", "--out", "x", "--kind", "clt", "--affine-skip",
                                       "--layers", "0-2,5", "--matryoshka", "256,512",
                                       "--corpus-tokens", "100", "--l0-control", "none"))
    assert (cfg.kind, cfg.affine_skip, cfg.layers, cfg.matryoshka, cfg.corpus_tokens,
            cfg.l0_control) == ("clt", True, [0, 1, 2, 5], [256, 512], 100, "none")
    # every option field of TrainConfig is an option of the command, with the same default
    args = vars(parse("train", "--out", "x"))
    options = [f for f in dataclasses.fields(TrainConfig) if f.metadata]
    assert options and all(args[f.name] == f.default for f in options)


def test_matryoshka_sizes_are_listed_not_ranges(capsys):
    with pytest.raises(SystemExit):  # '256-1024' once expanded to the 769 sizes in between
        parse("train", "--out", "x", "--matryoshka", "256-1024")
    assert "list the sizes" in capsys.readouterr().err


def test_the_graph_json_says_what_was_done(tmp_path):
    """The metadata records the settings that made the graph, and pruning again at the
    recorded thresholds keeps the same nodes and links as the file."""
    from support.tiny_gemma import CharTokenizer, tiny_replacement

    rm = tiny_replacement("clt", dtype=torch.float32)
    settings = TraceSettings(AttributionSettings(max_feature_nodes=20, batch_size=8, max_n_logits=3,
                                                 desired_logit_prob=0.9),
                             PruneSettings(0.7, 0.9), ("json",))
    rm.tokenizer = CharTokenizer()
    record = trace_prompt(rm, rm.tokenizer, PromptSpec("the cat sat", "g"), settings, tmp_path)
    data = json.loads((tmp_path / "g.json").read_text())
    meta = data["metadata"]
    assert meta["pruning_settings"] == dataclasses.asdict(settings.pruning)
    assert meta["node_threshold"] == 0.7
    gen = meta["generation_settings"]
    assert {k: gen[k] for k in dataclasses.asdict(settings.attribution)} == dataclasses.asdict(settings.attribution)
    assert record.graph.n_features == 20
    again = prune(record.graph, **meta["pruning_settings"])
    assert torch.equal(again.node_mask, record.result.node_mask)
    assert torch.equal(again.edge_mask, record.result.edge_mask)
    assert len(data["links"]) == int(again.edge_mask.sum())
    # the defaults would have kept something else: the thresholds are not decoration
    assert not torch.equal(prune(record.graph).edge_mask, again.edge_mask)
