"""QK attribution: a head's attention score split into the sources of its query and key streams.

With the frozen maps of :mod:`.maps`, ``s = scaling · (A_q r_L[q]) · (A_k r_L[k])``. Under the
frozen linear model each residual stream is a sum of the contributions of the sources (the
columns of :class:`cltrace.attribution.EdgeRows`: active features, error vectors, token
embeddings, in an image prompt the soft token vectors at their positions) plus a constant
(``b_dec`` and the MLP outputs of the positions without nodes, carried by the same frozen
paths). So with

    Q[:, i] = A_q · (contribution of source i to r_L[q])    [head_dim, n_cols], and Q_c the constant's
    K[:, j] = A_k · (contribution of source j to r_L[k])

the score splits exactly into pairs ``scaling · Q[:, i] · K[:, j]`` (the constants as one more
source on each side), and the *marginals* are one side against the other side's whole
vector: ``scaling · Q[:, i] · k_vec``. ``Q`` is ``head_dim`` rows of the attribution matrix:
the backward of the frozen model seeded on r_L[q] with the rows of ``A_q``
(:meth:`cltrace.frozen.FrozenLinearModel.iter_backward_live` with ``at_resid``), so its memory
is head_dim x sources, and the streams of no other position or layer are kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..attribution.rows import EdgeRows
from ..frozen.model import Seeds
from .maps import QKMaps
from .settings import QKSettings

CONST = -1  # the source index of the constants in pairs and marginals


@dataclass
class QKSide:
    """One side (query or key) of a score: its map's image of every source."""

    pos: int
    M: Tensor  # [head_dim, n_cols]  the map applied to each source's contribution
    const: Tensor  # [head_dim]  the map applied to the constants' contribution
    total: Tensor  # [head_dim]  the map applied to the real stream (q_vec or k_vec)


def constant_streams(rows: EdgeRows, layer: int) -> Tensor:
    """``[n_pos, d_model]``: r_layer when only the constants of the linearisation are input
    (``b_dec`` where there are nodes, the MLP outputs minus the skip where there are none;
    token embeddings and feature and error writes zero), through the frozen model."""
    st = rows.state
    fz = st.frozen
    r = torch.zeros(st.n_pos, 1, fz.d_model, dtype=fz.dtype, device=st.tokens.device)
    if layer == 0:
        return r[:, 0]
    bias = st.recon.bias.to(fz.dtype)
    return fz.run_layers(r, lambda L, x: bias[L][:, None], stop=layer)[:, 0]


def side(rows: EdgeRows, maps: QKMaps, A: Tensor, layer: int, pos: int, const: Tensor) -> QKSide:
    """The side read by the map ``A [head_dim, d_model]`` from r_layer[pos]."""
    hd = A.shape[0]
    seeds = Seeds(torch.full((hd,), layer, device=A.device), torch.full((hd,), pos, device=A.device), A)
    M = rows(seeds, at_resid=True)  # [hd, n_cols]
    return QKSide(pos, M, A @ const[pos], A @ maps.resid(layer, pos))


@dataclass
class QKTrace:
    """The split of one head's score at (query, key): top pairs and marginals, and the rest.

    Sources are columns of :class:`EdgeRows` (``CONST``: the constants). Identities (exact up
    to rounding): ``Σ pairs + pairs_rest = score``; ``Σ q_marginals + q_rest + q_constant =
    score``, the same for k."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # scaling · q_vec · k_vec, from the real streams
    prob: float  # the attention probability pattern[head, query, key]
    pairs: list  # [(q source, k source, attr)] by |attr|
    q_marginals: list  # [(source, attr)] by |attr|
    k_marginals: list
    q_constant: float
    k_constant: float
    pairs_rest: float
    q_rest: float
    k_rest: float


@dataclass
class QKDecomposition:
    """The whole split of one score: both sides' matrices (tests and :meth:`summary`)."""

    layer: int
    head: int
    scaling: float
    q: QKSide
    k: QKSide
    rows: Optional[EdgeRows] = None  # what the columns are (for :meth:`source_name`)

    def source_name(self, col: int, decode=lambda t: f"<{t}>") -> str:
        """What column ``col`` (or ``CONST``) is, e.g. ``token 4 ' France'``, ``error L3@4``,
        ``feature L5#123@4 (a=1.21)``, ``constants`` (``decode``: a token id's text; an image
        prompt's soft token is named by its cell, ``token 9 '<img 0,1>'``)."""
        if col == CONST:
            return f"constants into layer {self.layer}"
        st = self.rows.state
        if col >= self.rows.token_start:
            p = col - self.rows.token_start
            groups = st.image_groups
            if groups is not None and st.labels is not None and int(groups[p]) >= 0:
                return f"token {p} {st.labels[p]!r}"
            return f"token {p} {decode(int(st.tokens[p]))!r}"
        if col >= self.rows.error_start:
            L, p = divmod(col - self.rows.error_start, st.n_pos)
            return f"error L{L}@{p}"
        layer, pos, i = 0, 0, col
        for layer, a in enumerate(st.acts):  # the columns run layer by layer, then by position
            if i < a.feat_idx.numel():
                pos = int(a.rows()[i])
                return f"feature L{layer}#{int(a.feat_idx[i])}@{pos} (a={float(a.acts[i]):.3g})"
            i -= a.feat_idx.numel()
        raise IndexError(f"column {col} is out of range")

    @property
    def score(self) -> float:
        return float(self.scaling * (self.q.total @ self.k.total))

    def q_marginals(self) -> Tensor:
        """``[n_cols]``: each source's query-side share against the whole key."""
        return self.scaling * (self.k.total @ self.q.M)

    def k_marginals(self) -> Tensor:
        return self.scaling * (self.q.total @ self.k.M)

    def pair_matrix(self) -> Tensor:
        """``[n_cols + 1, n_cols + 1]`` every pair, the constants last on each side (small
        prompts and tests: the summary finds the top pairs without it)."""
        Q = torch.cat([self.q.M, self.q.const[:, None]], 1)
        K = torch.cat([self.k.M, self.k.const[:, None]], 1)
        return self.scaling * (Q.T @ K)

    def top_pairs(self, k: int) -> list:
        """The ``k`` pairs of largest |attr|, exactly, without forming every pair: query
        sources by decreasing norm, in blocks, until no later block can beat the k-th."""
        def nonzero(side: QKSide):
            cols = (side.M != 0).any(0).nonzero().flatten()
            vecs = torch.cat([side.M[:, cols].T, side.const[None]])  # [m + 1, hd]
            return torch.cat([cols, torch.tensor([CONST], device=cols.device)]), vecs

        qi, Qv = nonzero(self.q)
        ki, Kv = nonzero(self.k)
        Kv = Kv * self.scaling
        qn = Qv.norm(dim=1)
        order = qn.argsort(descending=True)
        k_max = float(Kv.norm(dim=1).max()) if len(ki) else 0.0
        best_v = Qv.new_zeros(0)
        best_i = torch.zeros(0, 2, dtype=torch.int64, device=Qv.device)
        for b in range(0, len(order), 512):
            blk = order[b:b + 512]
            if len(best_v) >= k and float(qn[blk[0]]) * k_max < float(best_v.abs().min()):
                break  # Cauchy-Schwarz: no pair of this block or later can enter the top k
            vals = Qv[blk] @ Kv.T  # [b, m_k]
            flat = vals.flatten()
            top = flat.abs().topk(min(k, flat.numel())).indices
            cand_v = torch.cat([best_v, flat[top]])
            cand_i = torch.cat([best_i, torch.stack([blk[top // vals.shape[1]], top % vals.shape[1]], 1)])
            keep = cand_v.abs().topk(min(k, len(cand_v))).indices
            best_v, best_i = cand_v[keep], cand_i[keep]
        order = best_v.abs().argsort(descending=True, stable=True)
        return [(int(qi[i]), int(ki[j]), float(v)) for (i, j), v in zip(best_i[order].tolist(), best_v[order])
                if v != 0]

    def summary(self, n_pairs: int = QKSettings.qk_pairs, n_marginals: int = QKSettings.qk_marginals,
                prob: float = float("nan")) -> QKTrace:
        """The top ``n_pairs`` pairs and ``n_marginals`` marginals per side, with the rest
        (``prob``: the head's attention probability at (query, key), recorded as given)."""
        score = self.score

        def top(marg: Tensor) -> list:
            idx = marg.abs().topk(min(n_marginals, marg.numel())).indices
            idx = idx[marg[idx] != 0]
            return [(int(i), float(marg[i])) for i in idx]

        qm, km = self.q_marginals(), self.k_marginals()
        q_const = float(self.scaling * (self.q.const @ self.k.total))
        k_const = float(self.scaling * (self.q.total @ self.k.const))
        q_top, k_top = top(qm), top(km)
        pairs = self.top_pairs(n_pairs)
        return QKTrace(self.layer, self.head, self.q.pos, self.k.pos, score, prob, pairs, q_top, k_top,
                       q_const, k_const, score - sum(v for *_, v in pairs),
                       score - q_const - sum(v for _, v in q_top), score - k_const - sum(v for _, v in k_top))


def side_keys(maps: QKMaps, layer: int, head: int, query: int, key: int) -> tuple:
    """The keys of a score's constant streams, query side and key side in :func:`decompose`'s
    ``sides``: the query side is the head's at its position, the key side its KV head's."""
    return ("const", layer), ("q", layer, head, query), ("k", layer, head // maps.rep, key)


def decompose(rows: EdgeRows, maps: QKMaps, layer: int, head: int, query: int, key: int,
              const: Optional[Tensor] = None, sides: Optional[dict] = None) -> QKDecomposition:
    """The split of head ``head`` of layer ``layer``'s score at (``query``, ``key``).
    ``rows`` must carry every position (``EdgeRows(state, carry_prefix=True)``): a key may
    lie among the positions without nodes (``<bos>`` often takes most of the attention), and in
    an image prompt after the query among the soft tokens of its image (both-way attention).
    ``const``: :func:`constant_streams` of the layer, if already computed; ``sides``: a dict
    keeping the sides computed, shared by the traces of one prompt (a query side is the
    head's at its position, a key side the KV head's: GQA heads share it)."""
    maps.check(layer, head, query, key)
    if rows.start:
        raise ValueError("QK attribution needs EdgeRows(state, carry_prefix=True)")
    sides = {} if sides is None else sides
    ckey, qkey, kkey = side_keys(maps, layer, head, query, key)
    if ckey not in sides:
        sides[ckey] = constant_streams(rows, layer) if const is None else const
    const = sides[ckey]
    if qkey not in sides:
        sides[qkey] = side(rows, maps, maps.query_map(layer, head, query), layer, query, const)
    if kkey not in sides:
        sides[kkey] = side(rows, maps, maps.key_map(layer, head, key), layer, key, const)
    return QKDecomposition(layer, head, maps.scaling, sides[qkey], sides[kkey], rows)
