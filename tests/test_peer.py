"""The same graph as circuit-tracer 0.5.0 on the same inputs (real Gemma 3 270M).

The reference runs from its own venv (``tests/support/peer.py``; ``.ci/run`` creates it, so in CI
this test runs rather than skips). Same model, same transcoders in each tool's layout (ours:
Gemma Scope 2; the peer's: its own, read by its ``load_transcoder_set`` / ``load_clt``), all
active features visited, for two sets: a per-layer transcoder (PLT) with an affine skip, and
a cross-layer transcoder (CLT; without skip: circuit-tracer's own CLT format and loader carry
none). The node sets are identical (features, logits; no nodes at ``<bos>`` on either side),
feature and error edges agree to float32 rounding (see ``MAX_DIFF``), and token edges differ by
exactly sqrt(d_model): circuit-tracer multiplies the gradient by Gemma 3's *unscaled* embedding
row (its embedding module scales by sqrt(d_model)), so its token edges miss the completeness
identity that ours satisfy.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.replacement import ReplacementModel
from cltrace.transcoders import load_transcoders
from support.layouts import write_circuit_tracer_clt, write_circuit_tracer_plt
from support.peer import agreement, peer_available, peer_model_dir, run_peer

pytestmark = [pytest.mark.real_model, pytest.mark.peer]

PROMPTS = ["The capital of France is", "Fact: Michael Jordan plays the sport of"]
# max |ours - theirs| / max |theirs| over the feature and error edges, and the same for the
# token edges after the sqrt(d_model) factor: about 3x the largest measured (float32 sums in
# another order; README: 2.3e-6). Measured (France / Michael Jordan prompt):
#   PLT + skip: edges 3.2e-6 / 2.8e-6, tokens 1.2e-6 / 2.4e-6
#   CLT:        edges 8.7e-7 / 8.9e-7, tokens 8.9e-7 / 7.8e-7
# (the sqrt(d_model) ratio itself: within 2.5e-7 of sqrt(640), relative)
MAX_DIFF = 1e-5


@pytest.fixture(scope="module")
def mlp_io(real_gemma):
    """Each layer's MLP inputs and outputs on 512 calibration tokens."""
    from cltrace.training.starter import collect_mlp_io

    return collect_mlp_io(real_gemma.model, real_gemma.tokenizer, 512)


@pytest.fixture(scope="module", params=["plt", "clt"])
def peer_inputs(request, real_gemma, mlp_io, tmp_path_factory):
    """(kind, our set's folder, the peer's set's folder, the peer's model copy)."""
    if not peer_available():
        if os.environ.get("CI"):
            pytest.fail("circuit-tracer's venv (benchmarks/.venv-peer) is missing: .ci/run creates it")
        pytest.skip("circuit-tracer's venv is not there (`python tests/support/peer.py` creates it)")
    from cltrace.training.starter import fit_starter_set
    from cltrace.transcoders.write import save_gemmascope

    kind = request.param
    out = tmp_path_factory.mktemp(f"peer-{kind}")
    X, Y = mlp_io
    ts = fit_starter_set(X, Y, kind=kind, width=512, l0=16, affine=kind == "plt", model_name="gemma-3-270m")
    if kind == "clt":
        # fit_starter_set fits only each feature's own-layer decoder (its cross-layer rows are
        # 1e-2-scale noise): give the rows writing to later layers half the norm of the
        # own-layer row, so the cross-layer paths carry a real share of every edge
        g = torch.Generator().manual_seed(1)
        for tc in ts.layers.values():
            if tc.n_out > 1:
                own = tc.W_dec[:, :1].norm(dim=-1, keepdim=True)  # [d_sae, 1, 1]
                later = torch.randn(tc.W_dec[:, 1:].shape, generator=g)
                tc.W_dec[:, 1:] = 0.5 * own * later / later.norm(dim=-1, keepdim=True)
    ours = save_gemmascope(ts, out / "gemmascope", l0=16)
    write = write_circuit_tracer_plt if kind == "plt" else write_circuit_tracer_clt
    theirs = write(out / "circuit-tracer", ts)
    return kind, ours, theirs, peer_model_dir(out)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_graph_as_circuit_tracer(prompt, peer_inputs, real_gemma, tmp_path):
    kind, ours, theirs, model_dir = peer_inputs
    tokens = real_gemma.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    torch.save(tokens, tmp_path / "tokens.pt")
    res = run_peer(model_dir, theirs, kind, tmp_path / "tokens.pt", tmp_path / "peer")
    assert res["ok"], res.get("trace")
    from safetensors.torch import load_file

    B = load_file(str(tmp_path / "peer") + ".safetensors")
    tcs = load_transcoders(ours)
    assert tcs.kind == kind and all(tc.n_out == (1 if kind == "plt" else tcs.n_layers - L)
                                    for L, tc in tcs.layers.items())
    rm = ReplacementModel(real_gemma.model, tcs, tokenizer=real_gemma.tokenizer)
    g = attribute(tokens, rm)  # every active feature
    A = {"features": g.features, "edges": g.edges, "logit_tokens": g.logit_tokens}
    agree = agreement(A, B, g.n_layers, g.n_pos)
    print(kind, prompt, agree)
    assert agree["features_a"] == agree["features_b"] == agree["shared_features"] > 100
    assert (g.features[:, 1] > 0).all() and (B["features"][:, 1] > 0).all()  # no <bos> features
    assert agree["logits_a"] == agree["logits_b"] == agree["shared_logits"]
    assert agree["max_abs_over_max"] <= MAX_DIFF
    assert agree["token_ratio"] == pytest.approx(math.sqrt(real_gemma.model.config.hidden_size), rel=MAX_DIFF)
    assert agree["token_max_abs_over_max"] <= MAX_DIFF
