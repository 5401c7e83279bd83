"""The left side of the completeness identity of an attribution graph: each target row's value
from the frozen linear model run forward, and the part of it that comes from bias terms alone
(its right side is the sum of the row's edges; tests/test_attribution.py, test_image_graph.py)."""
from __future__ import annotations

import torch


def target_values(state, graph):
    """Each target's value (feature pre-activation, logit-direction value at the last position)
    from the frozen model run forward, and the part of it from bias terms alone (b_enc, and
    b_dec / constants through the frozen model with no embeddings, features or errors)."""
    fz = state.frozen
    full = fz(state.embed, state.sources())
    bias_only = fz(torch.zeros_like(state.embed), state.recon.bias)
    values, biases = [], []
    for l, p, f in graph.features.tolist():
        tc = state.transcoders.layers[l]
        w = tc.W_enc[:, f]
        values.append(full.mlp_in[l, p] @ w + tc.b_enc[f])
        biases.append(bias_only.mlp_in[l, p] @ w + tc.b_enc[f])
    last = state.n_pos - 1
    for i in range(graph.n_logits):
        d = fz.logit_direction(graph.logit_tokens[i:i + 1])[0]
        values.append(fz.k_final(full.resid_final)[last] @ d)
        biases.append(fz.k_final(bias_only.resid_final)[last] @ d)
    return torch.stack(values), torch.stack(biases)
