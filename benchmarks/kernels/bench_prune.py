"""Pruning time and peak RSS on a large random attribution graph (default ~100k nodes).

    python benchmarks/bench_prune.py [--features 8192] [--n-pos 4800] [--n-layers 18]

The graph has the shape of a long-prompt graph: ``features`` visited feature rows plus 10
logit rows over N = features + (n_layers + 1) · n_pos + 10 nodes (8192 features at 4800
positions: 99,402 nodes, edges [8202, 99402] float32 = 3.3 GB), with causal structure
(a feature receives only from lower layers at positions <= its own) and 30% exact zeros.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch



def build(n_features: int, n_pos: int, n_layers: int, n_logits: int = 10, seed: int = 0):
    from cltrace.graph import Graph

    g = torch.Generator().manual_seed(seed)
    layers = torch.randint(0, n_layers, (n_features,), generator=g)
    pos = torch.randint(0, n_pos, (n_features,), generator=g)
    feats = torch.randint(0, 16384, (n_features,), generator=g)
    order = torch.argsort(layers * 10**9 + pos * 10**5 + feats)
    graph = Graph(prompt="", tokens=torch.arange(n_pos), token_strs=[""] * n_pos, n_layers=n_layers,
                  features=torch.stack([layers, pos, feats], 1)[order],
                  activations=torch.rand(n_features, generator=g) + 0.1,
                  logit_tokens=torch.arange(n_logits), logit_labels=[""] * n_logits,
                  logit_probs=torch.softmax(torch.randn(n_logits, generator=g), 0) * 0.9,
                  edges=torch.zeros(0), edge_targets=torch.zeros(0, dtype=torch.int64))
    table = graph.nodes()
    src_layer = table.layer.clone()
    src_layer[graph.token_start:graph.logit_start] = -1
    targets = torch.cat([torch.arange(n_features), torch.arange(graph.logit_start, graph.n_nodes)])
    edges = torch.randn(len(targets), graph.n_nodes, generator=g)
    for i in range(0, n_features, 512):  # causal mask, chunked: [512, N] bools at a time
        t = slice(i, min(i + 512, n_features))
        ok = (src_layer[None] < table.layer[t, None]) & (table.pos[None] <= table.pos[t, None])
        ok &= torch.rand(ok.shape, generator=g) < 0.7
        edges[t] *= ok
    edges[:, graph.logit_start:] = 0
    graph.edges, graph.edge_targets = edges, targets
    return graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=8192)
    ap.add_argument("--n-pos", type=int, default=4800)
    ap.add_argument("--n-layers", type=int, default=18)
    a = ap.parse_args()
    from cltrace.graph import prune

    t0 = time.perf_counter()
    graph = build(a.features, a.n_pos, a.n_layers)
    built = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    res = prune(graph)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"nodes {graph.n_nodes}, edges {tuple(graph.edges.shape)} ({graph.edges.numel() * 4 / 2**30:.1f} GiB); "
          f"built in {built:.1f} s; prune {dt:.1f} s; kept {int(res.node_mask.sum())} nodes, "
          f"{int(res.edge_mask.count_nonzero())} edges; peak RSS {rss0:.1f} GiB before, {rss:.1f} GiB after")


if __name__ == "__main__":
    main()
