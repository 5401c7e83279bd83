"""The visit of the features: which feature rows to compute, in which order.

Rows of the logits come first. Then, while fewer than ``n_visit`` features are visited, the
next ``update_interval * batch_size`` features by estimated influence on the logits are
scheduled and their rows computed, batch by batch. The estimate is push-style and needs only
each row once, as it is computed: a row ``i`` with weight ``c_i`` (a logit's probability, or
the feature's own estimate when its row was computed) adds ``c_i |A[i, j]| / Σ_k |A[i, k]|``
to every feature ``j``. For the first pick, from the logit rows alone, it equals the exact
influence ``wᵀÂ``. When every active feature is visited, the order is by position alone.

Scheduled features are computed in position order (then layer): consecutive batches share
their last position, and a backward batch costs Σ_rows (layer + 1) x (its last position + 1)
(:meth:`cltrace.frozen.FrozenLinearModel.iter_backward_live`).

The rows go to a store (:mod:`.stores`): dense or memory-bounded, chosen by size only; both
give the same graph.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..frozen.model import Seeds


def position_order(af, idx: Tensor, n_layers: int) -> Tensor:
    """The order of features ``idx`` by position, then layer."""
    return (af.pos[idx] * (n_layers + 1) + af.layer[idx]).argsort(stable=True)


def visit(state, rows_fn, af, logit_seeds: Seeds, logit_weights: Tensor, n_visit: int,
          batch_size: int, update_interval: int, store, progress: Callable[[int], None]
          ) -> tuple[Tensor, Tensor]:
    """Rows of the logits and of ``n_visit`` features chosen by estimated influence, kept in
    ``store``; returns ``store.result()``: ``(edges, selected)``."""
    n_feat = rows_fn.n_features
    est = torch.zeros(n_feat, dtype=torch.float64)  # influence estimate of every feature
    scheduled = torch.zeros(n_feat, dtype=torch.bool)
    seeds_done: list[Seeds] = []
    n_slots = 0

    def add_rows(seeds: Seeds, weight: Tensor, feat: Tensor) -> None:
        full = rows_fn(seeds).float().cpu()  # [B, n_cols]  transient
        absf = full[:, :n_feat].abs()
        rowsum = absf.sum(1, dtype=torch.float64) + full[:, n_feat:].abs().sum(1, dtype=torch.float64)
        coef = (weight / rowsum.clamp(min=1e-10)).to(torch.float32)
        est.add_((coef @ absf).double())
        store.add(full, feat)
        seeds_done.append(seeds)

    for i in range(0, logit_seeds.n, batch_size):
        sl = slice(i, i + batch_size)
        seeds = Seeds(*(t[sl] for t in logit_seeds))
        add_rows(seeds, logit_weights[sl], torch.full((seeds.n,), -1, dtype=torch.int64))
    while n_slots < n_visit:
        if n_visit == n_feat:  # everything: no ranking needed
            pending = torch.arange(n_feat)
        else:
            k = min(update_interval * batch_size, n_visit - n_slots)
            pending = est.masked_fill(scheduled, -1.0).argsort(descending=True, stable=True)[:k]
        pending = pending[position_order(af, pending, state.n_layers)]
        store.schedule(pending, seeds_done)
        scheduled[pending] = True
        n_slots += pending.numel()
        for idx in pending.split(batch_size):
            seeds = state.feature_seeds(af.layer[idx], af.pos[idx], af.feature[idx])
            add_rows(seeds, est[idx].clone(), idx)
            progress(idx.numel())
    return store.result()
