"""Attribution graphs on a tiny random Gemma 3: completeness identity, interventions, targets."""
from __future__ import annotations

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.replacement import ReplacementModel
from support.completeness import target_values
from support.frozen import backward, logit_seeds
from support.tiny_gemma import TOKENS, mlp_inputs, tiny_gemma, tiny_replacement
from support.transcoders import random_transcoders


@pytest.fixture(scope="module", params=["plt", "plt+skip", "clt"])
def replacement(request):
    return tiny_replacement(request.param)


@pytest.fixture(scope="module")
def full_graph(replacement):
    return attribute(TOKENS, replacement, batch_size=7)


def test_completeness_identity(replacement, full_graph):
    graph = full_graph
    state = replacement.run(TOKENS)
    assert graph.n_features == state.active_features().layer.numel() > 20
    values, biases = target_values(state, graph)
    # The pre-activation of each feature target equals its recorded pre-activation, too.
    pre = torch.cat([a.pre_acts for a in state.acts])
    torch.testing.assert_close(values[:graph.n_features], pre.double(), rtol=1e-5, atol=1e-6)  # norms run in fp32
    total = graph.edges.double().sum(1) + biases
    rel = ((total - values).abs() / values.abs().clamp_min(1e-3)).max()
    assert rel <= 1e-4, f"completeness identity off by {rel:.2e}"


def test_edges_equal_interventions(replacement, full_graph):
    graph = full_graph
    state = replacement.run(TOKENS)
    values, _ = target_values(state, graph)
    gen = torch.Generator().manual_seed(0)
    has_out = (graph.edges[:, :graph.n_features] != 0).any(0).nonzero().flatten()
    assert has_out.numel() > 10
    for s in has_out[torch.randperm(has_out.numel(), generator=gen)[:5]].tolist():
        layer, pos, feat = graph.features[s].tolist()
        act = float(graph.activations[s])
        tc = state.transcoders.layers[layer]
        sources = state.sources().clone()
        n_out = tc.n_out
        sources[layer:layer + n_out, pos] -= act * tc.W_dec[feat, :n_out]  # remove the feature
        saved = state.recon
        state.recon = saved._replace(features=saved.features - (state.sources() - sources))
        after, _ = target_values(state, graph)
        state.recon = saved
        change = values - after  # = edge weight of s into every target (features held fixed)
        torch.testing.assert_close(change.float(), graph.edges[:, s], rtol=1e-4, atol=1e-6)


def test_partial_visit_keeps_exact_rows(replacement, full_graph):
    full = full_graph
    part = attribute(TOKENS, replacement, batch_size=4, max_feature_nodes=10, update_interval=1)
    assert part.n_features == 10
    # Each visited feature's row equals the full graph's row, on the kept columns.
    keys = {tuple(r): i for i, r in enumerate(full.features.tolist())}
    idx = torch.tensor([keys[tuple(r)] for r in part.features.tolist()])
    cols = torch.cat([idx, torch.arange(full.n_features, full.n_nodes)])
    rows = torch.cat([idx, torch.arange(full.n_features, full.n_features + full.n_logits)])
    torch.testing.assert_close(part.edges, full.edges[rows][:, cols])
    # The first features visited are those the logits depend on most.
    from cltrace.reference import compute_influence, normalize_rows
    logit_rows = full.edges[full.n_features:]
    infl = compute_influence(normalize_rows(logit_rows), full.edge_targets[full.n_features:],
                             full.logit_weights())
    top = set(infl[:full.n_features].argsort(descending=True)[:4].tolist())
    assert top <= set(idx.tolist())


def test_targets_tokens_and_differences(replacement):
    g = attribute(TOKENS, replacement, targets=[5, (7, 9), (11, 3, 0.5)], max_feature_nodes=4)
    vocab = replacement.parts.config.vocab_size
    assert g.logit_tokens.tolist() == [5, vocab, vocab + 1]
    probs = torch.softmax(replacement.run(TOKENS).logits[-1].float(), -1)
    assert g.logit_probs[0] == pytest.approx(float(probs[5]))
    assert g.logit_probs[1:].tolist() == [1.0, 0.5]
    # A difference target's row is the difference of the two token rows.
    d = attribute(TOKENS, replacement, targets=[(7, 9)], max_feature_nodes=0)
    a = attribute(TOKENS, replacement, targets=[7, 9], max_feature_nodes=0)
    end = a.logit_start
    torch.testing.assert_close(d.edges[-1, :end], a.edges[-2, :end] - a.edges[-1, :end], rtol=1e-5, atol=1e-7)


def test_salient_logits_and_bad_arguments(replacement):
    g = attribute(TOKENS, replacement, max_n_logits=3, desired_logit_prob=0.99, max_feature_nodes=0)
    assert g.n_logits <= 3 and g.n_features == 0
    assert (g.logit_probs[:-1] >= g.logit_probs[1:]).all()
    for kw, msg in [({"max_n_logits": 0}, "max_n_logits"), ({"desired_logit_prob": 1.5}, "desired_logit_prob"),
                    ({"batch_size": 0}, "batch_size"), ({"targets": [10**9]}, "outside the vocabulary")]:
        with pytest.raises(ValueError, match=msg):
            attribute(TOKENS, replacement, **kw)


@pytest.mark.parametrize("skip", [False, True])
def test_same_graph_from_gemmascope_and_circuit_tracer_files(tmp_path, skip):
    """A PLT set written in the Gemma Scope 2 layout and in circuit-tracer's layout (the same
    weights) loads to the same transcoders and gives the same graph, edge for edge."""
    from cltrace.transcoders import load_transcoders
    from support.layouts import write_circuit_tracer_plt, write_gemmascope_plt

    model = tiny_gemma(n_layers=3, dtype=torch.float32)
    ts = random_transcoders("plt", mlp_in=mlp_inputs(model, TOKENS), skip=skip, d_sae=40)
    gs = load_transcoders(write_gemmascope_plt(tmp_path / "gs", ts))
    ct = load_transcoders(write_circuit_tracer_plt(tmp_path / "ct", ts))
    graphs = [attribute(TOKENS, ReplacementModel(model, t), batch_size=16) for t in (ts, gs, ct)]
    for g in graphs[1:]:
        assert torch.equal(g.features, graphs[0].features)
        assert torch.equal(g.logit_tokens, graphs[0].logit_tokens)
        # to rounding: the layouts load to differently strided tensors, whose GEMMs may take
        # other kernels (ulp-level differences seen on an AVX2-only CPU)
        torch.testing.assert_close(g.edges, graphs[0].edges, rtol=1e-6,
                                   atol=1e-6 * float(graphs[0].edges.abs().max()))
    assert graphs[0].n_features > 20


def test_both_stores_give_the_same_graph(replacement, full_graph):
    """One visitor, two stores: the dense store and the memory-bounded one (rows over visited
    columns only, earlier rows filled by recomputation or a forward JVP) visit the same
    features and give the same edges, which are the full graph's restricted to its nodes."""
    full = full_graph
    keys = {tuple(r): i for i, r in enumerate(full.features.tolist())}
    for kw in [dict(batch_size=3, max_feature_nodes=17, update_interval=1),
               dict(batch_size=5, max_feature_nodes=full.n_features - 1, update_interval=2),
               dict(batch_size=4, max_feature_nodes=4)]:
        bounded = attribute(TOKENS, replacement, bounded=True, **kw)
        dense = attribute(TOKENS, replacement, bounded=False, **kw)
        assert bounded.settings["bounded"] and not dense.settings["bounded"]
        assert bounded.n_features == kw["max_feature_nodes"]
        assert torch.equal(bounded.features, dense.features)
        torch.testing.assert_close(bounded.edges, dense.edges, rtol=1e-5, atol=1e-7)
        idx = torch.tensor([keys[tuple(r)] for r in dense.features.tolist()])
        assert (idx.diff() > 0).all()  # ascending feature order
        cols = torch.cat([idx, torch.arange(full.n_features, full.n_nodes)])
        rows = torch.cat([idx, torch.arange(full.n_features, full.n_features + full.n_logits)])
        assert torch.equal(dense.edges, full.edges[rows][:, cols])  # the same rows, bit for bit
    # The first pick (from the logit rows alone) is the exact influence ranking.
    from cltrace.graph import influence_of_rows

    logit_rows = full.edges[full.n_features:]
    w = full.logit_weights()
    infl, _ = influence_of_rows(logit_rows, full.edge_targets[full.n_features:], w)
    best = set(infl[:full.n_features].argsort(descending=True)[:4].tolist())
    first = attribute(TOKENS, replacement, batch_size=4, max_feature_nodes=4, update_interval=1)
    assert {keys[tuple(r)] for r in first.features.tolist()} == best


def test_forward_columns_equal_edge_rows(replacement):
    """A column by forward JVP (the bounded path's fill-in) equals the backward rows' entries."""
    from cltrace.attribution import EdgeRows
    from cltrace.frozen.jvp import feature_injections, forward_columns
    from cltrace.frozen import Seeds

    st = replacement.run(torch.tensor(TOKENS))
    af = st.active_features()
    g = torch.Generator().manual_seed(3)
    for trial in range(3):
        perm = torch.randperm(af.layer.numel(), generator=g)
        src, tgt = perm[:9], perm[9:20]
        if trial == 2:  # sources at late positions only: the JVP starts past position 0
            src = (af.pos >= 5).nonzero().flatten()[:6]
        targets = Seeds(*(torch.cat(t) for t in zip(
            logit_seeds(st, torch.tensor([3, 7])), st.feature_seeds(af.layer[tgt], af.pos[tgt], af.feature[tgt]))))
        full = EdgeRows(st)(targets)  # [n_targets, n_cols]
        inj = feature_injections(st, af.layer[src], af.pos[src], af.feature[src], af.value[src])
        cols = forward_columns(st.frozen, inj, src.numel(), targets)  # [n_targets, n_src]
        assert full[:, src].abs().max() > 0
        torch.testing.assert_close(cols, full[:, src], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_kv", [1, 2])
@pytest.mark.parametrize("skip", [1, 4])
def test_positions_without_nodes_are_not_carried_yet_give_exact_edges(n_kv, skip):
    """The backward leaves out the leading positions without nodes (<bos>, a chat prefix): the
    edges of their tokens come from the prefix paths. Every edge equals the full backward's
    (all positions carried, support.frozen.backward), sliding-window layers banded (window 3)."""
    from cltrace.attribution import EdgeRows
    from cltrace.frozen import Seeds
    from cltrace.frozen.attention import BandedPattern

    torch.manual_seed(1)
    model = tiny_gemma(n_layers=4, n_kv=n_kv, dtype=torch.float64)
    tokens = torch.tensor(TOKENS + [5, 77, 140])
    tcs = random_transcoders("plt", mlp_in=mlp_inputs(model, tokens), skip=True, d_sae=48)
    st = ReplacementModel(model, tcs, dtype=torch.float64, skip_positions=skip).run(tokens)
    assert any(isinstance(c.pattern, BandedPattern) for c in st.capture.layers)
    rows = EdgeRows(st)
    assert rows.start == skip and rows.prefix.shape == (4, skip, skip, st.frozen.d_model)
    af = st.active_features()
    assert int(af.pos.min()) >= skip
    seeds = Seeds(*(torch.cat(t) for t in zip(logit_seeds(st, torch.tensor([3, 7, 11])),
                                               st.feature_seeds(af.layer, af.pos, af.feature))))
    out = rows(seeds)  # [B, n_cols]
    ref = backward(st.frozen, seeds)  # every position carried
    tok = (ref.embed * st.embed[None]).sum(-1)  # [B, n_pos]
    assert tok[:, :skip].abs().max() > 0
    torch.testing.assert_close(out[:, rows.token_start:], tok, rtol=1e-10, atol=1e-12)
    for L in range(4):
        err = (ref.mlp_out[L] * st.errors[L][None]).sum(-1)  # [B, n_pos]
        cols = slice(rows.error_start + L * st.n_pos, rows.error_start + (L + 1) * st.n_pos)
        torch.testing.assert_close(out[:, cols], err, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="positions >= "):
        list(st.frozen.iter_backward_live(logit_seeds(st, torch.tensor([3]), pos=0), rows.prefix))


def test_attribute_leaves_the_callers_flush_denormal_setting(replacement):
    """attribute() flushes denormals while it runs (speed) and gives the caller's setting back,
    on or off (it used to turn it off after every call)."""
    def flushing() -> bool:
        return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        attribute(TOKENS, replacement, max_feature_nodes=0)
        assert flushing()
        torch.set_flush_denormal(False)
        attribute(TOKENS, replacement, max_feature_nodes=0)
        assert not flushing()
    finally:
        torch.set_flush_denormal(False)
