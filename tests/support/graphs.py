"""Random attribution graphs with the causal structure of real ones, for pruning/export tests."""
from __future__ import annotations

import torch

from cltrace.graph import Graph


def random_graph(n_layers=3, n_pos=5, n_features=30, n_logits=3, seed=0, token_strs=None) -> Graph:
    """A graph whose edges respect causality: a feature at (layer, pos) receives edges only
    from features/errors of lower layers at positions <= pos and from tokens at <= pos;
    logits (at the last position) from everything."""
    g = torch.Generator().manual_seed(seed)
    layers = torch.randint(0, n_layers, (n_features,), generator=g)
    pos = torch.randint(0, n_pos, (n_features,), generator=g)
    feats = torch.randint(0, 1000, (n_features,), generator=g)
    order = torch.argsort(layers * 10_000 + pos * 1000 + feats)
    features = torch.stack([layers, pos, feats], 1)[order]
    graph = Graph(
        prompt="a b c d e"[: 2 * n_pos - 1], tokens=torch.arange(100, 100 + n_pos),
        token_strs=token_strs or [f"t{i}" for i in range(n_pos)], n_layers=n_layers,
        features=features, activations=torch.rand(n_features, generator=g) + 0.1,
        logit_tokens=torch.arange(7, 7 + n_logits), logit_labels=[f"L{i}" for i in range(n_logits)],
        logit_probs=torch.softmax(torch.randn(n_logits, generator=g), 0) * 0.9,
        edges=torch.zeros(0), edge_targets=torch.zeros(0, dtype=torch.int64))
    N = graph.n_nodes
    table = graph.nodes()
    src_layer = table.layer.clone()
    src_layer[graph.token_start:graph.logit_start] = -1
    targets = torch.cat([torch.arange(n_features), torch.arange(graph.logit_start, N)])
    edges = torch.randn(len(targets), N, generator=g)
    for r, t in enumerate(targets.tolist()):
        if t < n_features:
            ok = (src_layer < table.layer[t]) & (table.pos <= table.pos[t])
        else:
            ok = torch.ones(N, dtype=torch.bool)
        ok[graph.logit_start:] = False
        edges[r] *= ok
        edges[r] *= (torch.rand(N, generator=g) < 0.7)  # some exact zeros
    graph.edges, graph.edge_targets = edges, targets
    return graph
