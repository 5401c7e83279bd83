"""Where the visitor keeps the rows it computed: all columns, or the visited columns only.

A store receives each batch of full rows ``[B, n_cols]`` (columns: [active features, errors,
tokens], :class:`cltrace.attribution.rows.EdgeRows`) once, and the features the visitor
schedules. Both return the same ``(edges, selected)``: rows of the visited features (ascending
active-feature index) then the logits; columns the same features, then errors, tokens and the
logits' zero columns. Which store holds a prompt is a memory choice only:

* :class:`DenseStore` keeps every row over all active-feature columns (``n_rows x n_cols``
  float32: fast, and a column scheduled late is already there);
* :class:`BoundedStore` keeps only the scheduled features' columns and the error/token
  columns (``n_rows x (n_visit + (n_layers + 1) * n_pos)``: 1M+ active features at 4096 tokens
  would take tens of GB densely). A feature scheduled after some rows were computed gets its
  entries in those rows exactly: by recomputing those rows when that visits fewer
  layer-positions, else by a forward JVP of the frozen model (:mod:`cltrace.frozen.jvp`).
  Every stored edge is exact; JVP-filled entries equal the backward's to rounding.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..frozen.jvp import feature_injections, forward_columns
from ..frozen.model import Seeds


def _cat_seeds(parts: list[Seeds]) -> Seeds:
    return Seeds(*(torch.cat(t) for t in zip(*parts)))


def _row_cost(seeds: Seeds, n_layers: int) -> int:
    """Layer-positions the backward of these rows visits
    (:meth:`~cltrace.frozen.FrozenLinearModel.iter_backward_live`)."""
    return int(((seeds.layer.clamp(max=n_layers) + 1) * (seeds.pos + 1)).sum())


def _column_cost(af, idx: Tensor, n_layers: int, n_pos: int) -> int:
    """Layer-positions the forward JVP of these features' columns visits (per column: the
    layers from its own up, the positions from its own on)."""
    return int(((n_layers - af.layer[idx]) * (n_pos - af.pos[idx])).sum())


class DenseStore:
    """Every row over all columns; the result is one gather of the kept columns."""

    def __init__(self, rows_fn, n_rows: int, n_visit: int, n_logits: int):
        self.n_feat, self.n_cols, self.n_logits = rows_fn.n_features, rows_fn.n_cols, n_logits
        self.rows = torch.zeros(n_rows, self.n_cols + n_logits, dtype=torch.float32)
        self.row_feat = torch.full((n_rows,), -1, dtype=torch.int64)  # -1: a logit row
        self.slot_feat = torch.empty(n_visit, dtype=torch.int64)
        self.filled = self.n_slots = 0

    @staticmethod
    def nbytes(rows_fn, n_rows: int, n_logits: int) -> int:
        return 4 * n_rows * (rows_fn.n_cols + n_logits)

    def schedule(self, pending: Tensor, seeds_done: list[Seeds]) -> None:
        self.slot_feat[self.n_slots:self.n_slots + pending.numel()] = pending
        self.n_slots += pending.numel()

    def add(self, full: Tensor, feat: Tensor) -> None:
        """``full [B, n_cols]`` rows of the features ``feat [B]`` (-1 for logit rows)."""
        B = full.shape[0]
        self.rows[self.filled:self.filled + B, :self.n_cols] = full
        self.row_feat[self.filled:self.filled + B] = feat
        self.filled += B

    def result(self) -> tuple[Tensor, Tensor]:
        selected = self.slot_feat.sort().values  # ascending active-feature index
        # rows: features by index, then the logits in their order
        key = torch.where(self.row_feat < 0, self.n_feat + torch.arange(self.rows.shape[0]), self.row_feat)
        order = key.argsort()
        cols = torch.cat([selected, torch.arange(self.n_feat, self.n_cols + self.n_logits)])
        return self.rows[order[:, None], cols[None, :]], selected  # one gather: no full-width copy


class BoundedStore:
    """The scheduled features' columns (slot order) and the error/token columns only."""

    def __init__(self, rows_fn, n_rows: int, n_visit: int, n_logits: int, state, af, batch_size: int):
        self.rows_fn, self.state, self.af, self.batch_size = rows_fn, state, af, batch_size
        self.n_feat, self.n_logits = rows_fn.n_features, n_logits
        n_et = rows_fn.n_cols - self.n_feat  # error and token columns
        self.F = torch.zeros(n_rows, n_visit, dtype=torch.float32)  # feature columns, slot order
        self.ET = torch.zeros(n_rows, n_et, dtype=torch.float32)
        self.slot_feat = torch.empty(n_visit, dtype=torch.int64)
        self.row_feat = torch.full((n_rows,), -1, dtype=torch.int64)
        self.filled = self.n_slots = 0

    def schedule(self, pending: Tensor, seeds_done: list[Seeds]) -> None:
        """New columns ``pending``: their exact entries in the rows computed so far."""
        k, new = pending.numel(), slice(self.n_slots, self.n_slots + pending.numel())
        self.slot_feat[new] = pending
        st, af = self.state, self.af
        if self.filled:
            targets = _cat_seeds(seeds_done)
            if _row_cost(targets, st.n_layers) <= _column_cost(af, pending, st.n_layers, st.n_pos):
                r = 0
                for seeds in seeds_done:
                    self.F[r:r + seeds.n, new] = self.rows_fn(seeds)[:, pending].float().cpu()
                    r += seeds.n
            else:
                for j in range(0, k, self.batch_size):
                    idx = pending[j:j + self.batch_size]
                    inj = feature_injections(st, af.layer[idx], af.pos[idx], af.feature[idx], af.value[idx])
                    cols = forward_columns(st.frozen, inj, idx.numel(), targets)  # [filled, b]
                    self.F[:self.filled, self.n_slots + j:self.n_slots + j + idx.numel()] = cols.float().cpu()
        self.n_slots += k

    def add(self, full: Tensor, feat: Tensor) -> None:
        B = full.shape[0]
        self.F[self.filled:self.filled + B, :self.n_slots] = full[:, self.slot_feat[:self.n_slots]]
        self.ET[self.filled:self.filled + B] = full[:, self.n_feat:]
        self.row_feat[self.filled:self.filled + B] = feat
        self.filled += B

    def result(self) -> tuple[Tensor, Tensor]:
        n_rows, n_visit = self.F.shape
        n_et = self.ET.shape[1]
        col_order = self.slot_feat.argsort()
        selected = self.slot_feat[col_order]
        key = torch.where(self.row_feat < 0, self.n_feat + torch.arange(n_rows), self.row_feat)
        row_order = key.argsort()
        edges = torch.zeros(n_rows, n_visit + n_et + self.n_logits, dtype=torch.float32)
        for i in range(0, n_rows, 1024):  # chunked: no second full copy of ET
            r = row_order[i:i + 1024]
            edges[i:i + r.numel(), :n_visit] = self.F[r][:, col_order]
            edges[i:i + r.numel(), n_visit:n_visit + n_et] = self.ET[r]
        return edges, selected


def make_store(state, rows_fn, af, n_visit: int, n_logits: int, batch_size: int,
               dense_limit_bytes: int, bounded=None):
    """The dense store when its rows fit ``dense_limit_bytes`` (or ``bounded=False``), else the
    memory-bounded one."""
    n_rows = n_logits + n_visit
    if bounded is None:
        bounded = DenseStore.nbytes(rows_fn, n_rows, n_logits) > dense_limit_bytes
    if bounded:
        return BoundedStore(rows_fn, n_rows, n_visit, n_logits, state, af, batch_size)
    return DenseStore(rows_fn, n_rows, n_visit, n_logits)
