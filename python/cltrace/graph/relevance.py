"""Where a graph's influence sits: a token x layer map of its nodes' influence on the targets.

``relevance[0, p]`` is the influence of the token node at position p, ``relevance[L + 1, p]``
the summed influence of the feature and error nodes of layer L at position p; the influence
is the one pruning ranks nodes by (:mod:`.influence`), so each cell reads "how much of the
graph's effect on its logits passes through here" — which words mattered, and at what depth.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .graph import Graph


def relevance(graph: Graph, influence: Tensor) -> Tensor:
    """``[n_layers + 1, n_pos]`` float64 from the nodes' ``influence [N]`` (the rows: tokens,
    then layers 0 .. n_layers - 1)."""
    n, L = graph.n_pos, graph.n_layers
    out = torch.zeros(L + 1, n, dtype=torch.float64)
    infl = influence.double()
    out[0] = infl[graph.token_start:graph.token_start + n]
    out[1:] = infl[graph.error_start:graph.error_start + L * n].view(L, n)
    f = graph.features
    if f.shape[0]:
        out[1:].index_put_((f[:, 0], f[:, 1]), infl[:graph.n_features], accumulate=True)
    return out
