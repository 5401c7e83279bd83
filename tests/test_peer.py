"""The same graph as circuit-tracer 0.5.0 on the same inputs (real Gemma 3 270M).

The reference runs from its own venv (``tests/peer.py``; ``.ci/run`` creates it, so in CI
this test runs rather than skips). Same model, same transcoders in each tool's layout, all
active features visited: the node sets are identical (features, logits; no nodes at
``<bos>`` on either side), feature and error edges agree to 1e-4 of the largest edge, and
token edges differ by exactly sqrt(d_model): circuit-tracer multiplies the gradient by
Gemma 3's *unscaled* embedding row (its embedding module scales by sqrt(d_model)), so its
token edges miss the completeness identity that ours satisfy.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.replacement import ReplacementModel
from cltrace.transcoders import load_transcoders
from peer import agreement, peer_available, peer_model_dir, run_peer
from synthetic import write_circuit_tracer_plt

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "Fact: Michael Jordan plays the sport of"]


@pytest.fixture(scope="module")
def peer_inputs(real_gemma, tmp_path_factory):
    if not peer_available():
        if os.environ.get("CI"):
            pytest.fail("circuit-tracer's venv (benchmarks/.venv-peer) is missing: .ci/run creates it")
        pytest.skip("circuit-tracer's venv is not there (`python tests/peer.py` creates it)")
    from cltrace.training.starter import collect_mlp_io, fit_starter_set
    from cltrace.transcoders.write import save_gemmascope

    out = tmp_path_factory.mktemp("peer")
    X, Y = collect_mlp_io(real_gemma.model, real_gemma.tokenizer, 512)
    ts = fit_starter_set(X, Y, kind="plt", width=512, l0=16, affine=True, model_name="gemma-3-270m")
    ours = save_gemmascope(ts, out / "gemmascope", l0=16)
    theirs = write_circuit_tracer_plt(out / "circuit-tracer", ts)
    return out, ours, theirs, peer_model_dir(out)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_graph_as_circuit_tracer(prompt, peer_inputs, real_gemma, tmp_path):
    out, ours, theirs, model_dir = peer_inputs
    tokens = real_gemma.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    torch.save(tokens, tmp_path / "tokens.pt")
    res = run_peer(model_dir, theirs, "plt", tmp_path / "tokens.pt", tmp_path / "peer")
    assert res["ok"], res.get("trace")
    from safetensors.torch import load_file

    B = load_file(str(tmp_path / "peer") + ".safetensors")
    rm = ReplacementModel(real_gemma.model, load_transcoders(ours), tokenizer=real_gemma.tokenizer)
    g = attribute(tokens, rm)  # every active feature
    A = {"features": g.features, "edges": g.edges, "logit_tokens": g.logit_tokens}
    agree = agreement(A, B, g.n_layers, g.n_pos)
    print(prompt, agree)
    assert agree["features_a"] == agree["features_b"] == agree["shared_features"] > 100
    assert (g.features[:, 1] > 0).all() and (B["features"][:, 1] > 0).all()  # no <bos> features
    assert agree["logits_a"] == agree["logits_b"] == agree["shared_logits"]
    assert agree["max_abs_over_max"] <= 1e-4
    assert agree["token_ratio"] == pytest.approx(math.sqrt(real_gemma.model.config.hidden_size), rel=1e-4)
    assert agree["token_max_abs_over_max"] <= 1e-4
