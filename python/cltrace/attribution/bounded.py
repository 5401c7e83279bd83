"""Memory-bounded visiting: exact rows over [visited features, errors, tokens] only.

The dense path of :func:`cltrace.attribution.trace` stores every target row over *all*
active-feature columns (1M+ columns at 4096 tokens: tens of GB), although the final graph
keeps only the visited features' columns. Here each full row lives only transiently, per
batch, to

* update a ranking estimate of the unvisited features (a push-style influence estimate:
  ``est[j] += (c_i / Σ_k |A[i, k]|) · |A[i, j]|`` with ``c_i`` the logit weight of a logit row
  or the estimate of a feature row when it was computed; for the first pick, from the logit
  rows alone, it equals the exact influence), and
* copy out the exact entries of the columns kept: the features scheduled so far (in slot
  order), the error nodes and the tokens.

A feature scheduled after some rows were computed gets its entries in those rows from an exact
forward JVP (:func:`cltrace.frozen.jvp.forward_columns`). The ranking is a heuristic (it may pick
other features than the dense path's exact re-ranking); every stored edge is exact.
Memory: ``n_rows x (n_visit + (n_layers + 1) * n_pos)`` plus one batch of full rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..frozen.jvp import feature_injections, forward_columns
from ..frozen.model import Seeds


def _cat_seeds(parts: list[Seeds]) -> Seeds:
    return Seeds(*(torch.cat(t) for t in zip(*parts)))


def _row_cost(seeds: Seeds, n_layers: int) -> int:
    """Layer-positions the backward of these rows visits (:meth:`iter_backward_live`)."""
    return int(((seeds.layer.clamp(max=n_layers) + 1) * (seeds.pos + 1)).sum())


def _column_cost(af, idx: Tensor, n_layers: int, n_pos: int) -> int:
    """Layer-positions the forward JVP of these features' columns visits (per column: the
    layers from its own up, the positions from its own on)."""
    return int(((n_layers - af.layer[idx]) * (n_pos - af.pos[idx])).sum())


def position_order(af, idx: Tensor, n_layers: int) -> Tensor:
    """The order of features ``idx`` by position, then layer: consecutive batches of it share
    their last position. A backward batch costs Σ_rows (layer + 1) x (its last position + 1)
    (:meth:`cltrace.frozen.FrozenLinearModel.iter_backward_live`), a forward-JVP batch
    (layers above its lowest) x (positions after its first)."""
    return (af.pos[idx] * (n_layers + 1) + af.layer[idx]).argsort(stable=True)


def visit_bounded(state, rows_fn, af, logit_seeds: Seeds, logit_weights: Tensor, n_visit: int,
                  batch_size: int, update_interval: int, progress: Callable[[int], None]
                  ) -> tuple[Tensor, Tensor]:
    """Rows of the logits and of ``n_visit`` features chosen by estimated influence.

    Returns ``edges [n_logits + n_visit, n_visit + n_err_tok + n_logits]`` (rows: visited
    features in ascending active-feature order, then the logits; columns: the same features,
    then errors, tokens and the logits' zero columns) and ``selected [n_visit]`` (active-feature indices, ascending)."""
    n_feat, n_logits = rows_fn.n_features, logit_seeds.n
    n_et = rows_fn.n_cols - n_feat  # error and token columns
    n_rows = n_logits + n_visit
    F = torch.zeros(n_rows, n_visit, dtype=torch.float32)  # feature columns, slot order
    ET = torch.zeros(n_rows, n_et, dtype=torch.float32)  # error and token columns
    slot_feat = torch.empty(n_visit, dtype=torch.int64)  # active-feature index of each slot
    est = torch.zeros(n_feat, dtype=torch.float64)  # influence estimate of every feature
    scheduled = torch.zeros(n_feat, dtype=torch.bool)
    seeds_done: list[Seeds] = []
    filled, n_slots = 0, 0

    def add_rows(seeds: Seeds, weight: Tensor) -> None:
        nonlocal filled
        full = rows_fn(seeds).float().cpu()  # [B, n_cols]  transient
        absf = full[:, :n_feat].abs()
        rowsum = absf.sum(1, dtype=torch.float64) + full[:, n_feat:].abs().sum(1, dtype=torch.float64)
        coef = (weight / rowsum.clamp(min=1e-10)).to(torch.float32)
        est.add_((coef @ absf).double())
        B = seeds.n
        F[filled:filled + B, :n_slots] = full[:, slot_feat[:n_slots]]
        ET[filled:filled + B] = full[:, n_feat:]
        seeds_done.append(seeds)
        filled += B

    for i in range(0, n_logits, batch_size):
        sl = slice(i, i + batch_size)
        add_rows(Seeds(*(t[sl] for t in logit_seeds)), logit_weights[sl])
    while n_slots < n_visit:
        score = est.masked_fill(scheduled, -1.0)
        k = min(update_interval * batch_size, n_visit - n_slots)
        pending = score.argsort(descending=True, stable=True)[:k]
        pending = pending[position_order(af, pending, state.n_layers)]
        slot_feat[n_slots:n_slots + k] = pending
        scheduled[pending] = True
        # exact entries of the new columns in the rows computed so far: a forward JVP per
        # column, or the rows again when that is cheaper (few rows so far, e.g. the logits')
        targets = _cat_seeds(seeds_done)
        new = slice(n_slots, n_slots + k)
        if _row_cost(targets, state.n_layers) <= _column_cost(af, pending, state.n_layers, state.n_pos):
            r = 0
            for seeds in seeds_done:
                F[r:r + seeds.n, new] = rows_fn(seeds)[:, pending].float().cpu()
                r += seeds.n
        else:
            for j in range(0, k, batch_size):
                idx = pending[j:j + batch_size]
                inj = feature_injections(state, af.layer[idx], af.pos[idx], af.feature[idx], af.value[idx])
                cols = forward_columns(state.frozen, inj, idx.numel(), targets)  # [filled, b]
                F[:filled, n_slots + j:n_slots + j + idx.numel()] = cols.float().cpu()
        n_slots += k
        for idx in pending.split(batch_size):
            seeds = state.feature_seeds(af.layer[idx], af.pos[idx], af.feature[idx])
            add_rows(seeds, est[idx].clone())
            progress(idx.numel())
    # order rows and columns by active-feature index (logit rows last)
    col_order = slot_feat.argsort()
    selected = slot_feat[col_order]
    row_order = torch.cat([n_logits + col_order, torch.arange(n_logits)])
    edges = torch.zeros(n_rows, n_visit + n_et + n_logits, dtype=torch.float32)  # + logit columns
    for i in range(0, n_rows, 1024):  # chunked: no second full copy of ET
        r = row_order[i:i + 1024]
        edges[i:i + r.numel(), :n_visit] = F[r][:, col_order]
        edges[i:i + r.numel(), n_visit:n_visit + n_et] = ET[r]
    return edges, selected
