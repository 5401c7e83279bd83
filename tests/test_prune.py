"""Pruning and graph scores against a dense N x N implementation of the method, and the
compiled pruning passes (ops.edge_*) against their pure-torch twins."""
from __future__ import annotations

import pytest
import torch

from cltrace import ops, reference as ref
import cltrace.graph.pruning as P
from cltrace.graph import graph_scores, influence_of_rows
from support.graphs import random_graph


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
    scores = graph_scores(g)
    assert scores.replacement == pytest.approx(float(replacement), rel=1e-5)
    assert scores.completeness == pytest.approx(float(completeness), rel=1e-5)
    assert 0 < scores.replacement < 1 and 0 < scores.completeness < 1


def test_scores_are_one_without_errors():
    g = random_graph(seed=5)
    g.edges[:, g.error_start:g.token_start] = 0
    s = graph_scores(g)
    assert s.replacement == pytest.approx(1.0) and s.completeness == pytest.approx(1.0)


def test_compute_influence_matches_power_series():
    g = random_graph(n_layers=4, n_pos=6, n_features=60, seed=2)
    g.edges = g.edges.double()
    A, w = g.to_dense(), g.logit_weights()
    m = A.abs() / A.abs().sum(1, keepdim=True).clamp(min=1e-10)
    cur, inf = w @ m, torch.zeros_like(w)
    while cur.any():
        inf += cur
        cur = cur @ m
    got = ref.compute_influence(ref.normalize_rows(g.edges), g.edge_targets, w)
    torch.testing.assert_close(got, inf)
    # the copy-free form attribution re-ranks with, also on rows in any order (the dense path's)
    torch.testing.assert_close(influence_of_rows(g.edges, g.edge_targets, w)[0], inf)
    perm = torch.randperm(g.edges.shape[0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(influence_of_rows(g.edges[perm], g.edge_targets[perm], w)[0], inf)
    got32 = influence_of_rows(g.edges.float()[perm], g.edge_targets[perm], w)[0]
    torch.testing.assert_close(got32, inf, rtol=1e-5, atol=1e-6)


def edge_inputs(R, N, dtype, seed=0):
    """Edges with runs of zeros (causal masking) and scattered ones, random row/column masks."""
    g = torch.Generator().manual_seed(seed)
    edges = torch.randn(R, N, generator=g, dtype=torch.float64) * torch.rand(R, 1, generator=g)
    edges *= torch.rand(R, N, generator=g) > 0.3
    edges[:, : N // 3] *= torch.rand(R, 1, generator=g) > 0.5  # whole zero runs in some rows
    rows, cols = torch.rand(R, generator=g) < 0.8, torch.rand(N, generator=g) < 0.7
    scale = edges.abs().sum(1).clamp(min=1e-10)
    weight = torch.rand(R, generator=g, dtype=torch.float64)
    return edges.to(dtype), scale.to(dtype), weight.to(dtype), rows, cols


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("R,N", [(1, 1), (7, 33), (37, 2600)])  # N across vector/segment/block ends
def test_edge_ops_match_reference(dtype, R, N):
    edges, scale, weight, rows, cols = edge_inputs(R, N, dtype)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(ops.edge_abs_row_sums(edges, rows, cols),
                               ref.edge_abs_row_sums(edges, rows, cols), **tol)
    args = (edges, scale, weight, rows, cols)
    torch.testing.assert_close(ops.edge_score_col_sums(*args), ref.edge_score_col_sums(*args), **tol)
    torch.testing.assert_close(ops.edge_score_histogram(*args), ref.edge_score_histogram(*args), **tol)
    s = ref._edge_scores(edges, scale, weight, rows[:, None] & cols[None])
    smallest = float(s[s > 0].min()) if (s > 0).any() else 1.0
    top = float(s.max())
    for lo, hi in ((0.0, 0.0), (0.0, top / 5), (top / 3, top / 2), (smallest, smallest * 1.01), (1e30, 1e31)):
        got, want = ops.edge_score_mask(*args, lo, hi), ref.edge_score_mask(*args, lo, hi)
        for a, b in zip(got, want):
            assert torch.equal(a, b), (lo, hi)  # the same entries, bit for bit


def test_edge_ops_empty_bad_input_and_opcheck():
    edges, scale, weight, rows, cols = edge_inputs(5, 40, torch.float32)
    assert ops.edge_abs_row_sums(edges[:0], rows[:0], cols).shape == (0,)
    m = ops.edge_score_mask(edges[:, :0], scale, weight, rows, cols[:0], 0.0, 1.0)
    assert m.mask.shape == (5, 0) and m.n_in.tolist() == [0] * 5 and m.band_rows.numel() == 0
    with pytest.raises(RuntimeError, match="col_mask must be a 1-D bool tensor of 40 entries"):
        ops.edge_abs_row_sums(edges, rows, cols[:-1])
    with pytest.raises(RuntimeError, match="scale must be a 1-D Float tensor of R = 5"):
        ops.edge_score_histogram(edges, scale.double(), weight, rows, cols)
    with pytest.raises(RuntimeError, match="edges must be float32 or float64"):
        ops.edge_abs_row_sums(edges.half(), rows, cols)
    args = (edges, scale, weight, rows, cols)
    for name in ("edge_score_col_sums", "edge_score_histogram"):
        torch.library.opcheck(getattr(torch.ops.cltrace, name).default, args)
    torch.library.opcheck(torch.ops.cltrace.edge_abs_row_sums.default, (edges, rows, cols))
    torch.library.opcheck(torch.ops.cltrace.edge_score_mask.default, (*args, 0.01, 0.1),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_edge_ops_name_the_bad_argument():
    # The passes' contract (csrc/checks/prune.h): metadata only, on every call.
    edges, scale, weight, rows, cols = edge_inputs(5, 40, torch.float64)
    args = (scale, weight, rows, cols)
    with pytest.raises(RuntimeError, match="edge_score_col_sums: edges must be 2-D \\[R, N\\], "
                                           "got shape \\[200\\]"):
        ops.edge_score_col_sums(edges.reshape(-1), *args)
    with pytest.raises(RuntimeError, match="edge_abs_row_sums: row_mask must be a 1-D bool tensor of "
                                           "5 entries, got Long \\[5\\]"):
        ops.edge_abs_row_sums(edges, rows.long(), cols)
    with pytest.raises(RuntimeError, match="edge_score_mask: weight must be a 1-D Double tensor of "
                                           "R = 5 entries, got Double \\[4\\]"):
        ops.edge_score_mask(edges, scale, weight[:4], rows, cols, 0.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_cut_equals_dense_threshold(dtype, monkeypatch):
    """The block's entries with score >= find_threshold(all block scores), ties and zeros included."""
    edges, scale, weight, rows, cols = edge_inputs(60, 3000, dtype, seed=4)
    edges[3, 100:400] = edges[3, 100]  # ties
    block = rows[:, None] & cols[None]
    s = ref._edge_scores(edges, scale, weight, block)
    for frac in (0.1, 0.5, 0.9, 0.98, 1.0):
        for limit in (P._SORT_LIMIT, 0):  # find_threshold by sorting and by its histogram
            monkeypatch.setattr(P, "_SORT_LIMIT", limit)
            want = s >= P.find_threshold(s, frac)
            mask, n_out, n_in = P._edge_cut(edges, scale, weight, rows, cols, frac)
            assert torch.equal(mask, want), (frac, limit)
            assert torch.equal(n_out, want.sum(0)) and torch.equal(n_in, want.sum(1))
    zero = torch.zeros_like(weight)  # all scores 0: the cut is 0 and every block entry passes
    mask, _, _ = P._edge_cut(edges, scale, zero, rows, cols, 0.5)
    assert torch.equal(mask, block)
