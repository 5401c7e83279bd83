"""Pruning and graph scores against a dense N x N implementation of the method."""
from __future__ import annotations

import pytest
import torch

from cltrace import prune as P
from graph_fixtures import random_graph


def dense_reference(A, w, n_features, keep_from, node_t, edge_t):
    """The method on a dense [N, N] matrix, written directly from its description."""
    def norm(m):
        m = m.abs()
        return m / m.sum(1, keepdim=True).clamp(min=1e-10)

    def influence(m):
        cur, tot = w @ m, torch.zeros_like(w)
        while cur.any():
            tot += cur
            cur = cur @ m
        return tot

    def cut(scores, frac):
        s = scores.flatten().sort(descending=True).values
        share = s.cumsum(0) / s.sum()
        i = int(torch.searchsorted(share, torch.tensor([frac], dtype=s.dtype)))
        return s[min(i, max(int((s > 0).sum()) - 1, 0))]

    inf = influence(norm(A))
    nodes = inf >= cut(inf, node_t)
    nodes[keep_from:] = True
    pruned = A.clone()
    pruned[~nodes] = 0
    pruned[:, ~nodes] = 0
    pn = norm(pruned)
    scores = pn * (influence(pn) + w)[:, None]
    edges = scores >= cut(scores, edge_t)
    while True:
        old = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        nodes[:keep_from] &= edges[:, :keep_from].any(0)
        nodes[:n_features] &= edges[:n_features].any(1)
        if torch.equal(old, nodes):
            return inf, nodes, edges


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("node_t,edge_t", [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0)])
def test_prune_matches_dense_method(seed, node_t, edge_t):
    g = random_graph(n_layers=4, n_pos=6, n_features=60, seed=seed)
    g.edges = g.edges.double()
    inf, nodes, edges = dense_reference(g.to_dense(), g.logit_weights(), g.n_features,
                                        g.token_start, node_t, edge_t)
    res = P.prune(g, node_t, edge_t)
    torch.testing.assert_close(res.influence, inf)
    assert torch.equal(res.node_mask, nodes)
    assert torch.equal(res.edge_mask, edges[g.edge_targets])
    assert res.node_mask[g.token_start:].all(), "tokens and logits are always kept"
    assert 0 < res.node_mask[:g.n_features].sum() <= g.n_features
    if node_t < 1:
        assert res.node_mask[:g.n_features].sum() < g.n_features, "something must be pruned"


def test_histogram_threshold_equals_sort(monkeypatch):
    torch.manual_seed(1)
    scores = torch.rand(50_000) ** 4  # many magnitudes
    scores[::7] = 0
    scores[100:200] = scores[100]  # ties
    for frac in (0.1, 0.5, 0.8, 0.98, 1.0):
        by_sort = P.find_threshold(scores, frac)
        monkeypatch.setattr(P, "_SORT_LIMIT", 0)
        monkeypatch.setattr(P, "_CHUNK", 4096)
        assert P.find_threshold(scores, frac) == by_sort
        monkeypatch.undo()
    assert P.find_threshold(scores, 1.0) == float(scores[scores > 0].min())
    assert P.find_threshold(torch.zeros(10), 0.5) == 0.0


def test_thresholds_outside_unit_interval_are_errors():
    g = random_graph()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="node_threshold must be in \\(0, 1\\]"):
            P.prune(g, node_threshold=bad)
        with pytest.raises(ValueError, match="edge_threshold must be in \\(0, 1\\]"):
            P.prune(g, edge_threshold=bad)


def test_scores_match_dense_definition():
    g = random_graph(seed=3)
    A, w = g.to_dense().double(), g.logit_weights()
    m = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-10)
    cur, inf = w @ m, torch.zeros_like(w)
    while cur.any():
        inf += cur
        cur = cur @ m
    err = slice(g.error_start, g.token_start)
    tok = inf[g.token_start:g.logit_start].sum()
    replacement = tok / (tok + inf[err].sum())
    out = inf + w
    completeness = ((1 - m[:, err].sum(1)) * out).sum() / out.sum()
    scores = P.graph_scores(g)
    assert scores.replacement == pytest.approx(float(replacement), rel=1e-5)
    assert scores.completeness == pytest.approx(float(completeness), rel=1e-5)
    assert 0 < scores.replacement < 1 and 0 < scores.completeness < 1


def test_scores_are_one_without_errors():
    g = random_graph(seed=5)
    g.edges[:, g.error_start:g.token_start] = 0
    s = P.graph_scores(g)
    assert s.replacement == pytest.approx(1.0) and s.completeness == pytest.approx(1.0)
