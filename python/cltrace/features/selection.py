"""Bounded per-feature selections: for every feature, the K entries with the smallest key.

One structure serves two purposes (see :mod:`cltrace.features.state`):

* top-K activating examples: key ``-act`` (largest activations first);
* a uniform random sample of a feature's firings: key = a 32-bit hash of
  ``(seed, layer, feature, token)`` (bottom-K sampling, deterministic per seed).

Entries are ordered by ``(key, tok)`` (``tok`` = the global token id ``row * ctx + pos``), a
total order, so the selection is EXACT and independent of the order entries arrive in:
updating batch by batch, resuming, or merging shards all give the same K entries as one pass
over the whole corpus.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EMPTY_TOK = torch.iinfo(torch.int64).max  # tok of an empty slot (sorts last)
_M32 = 0xFFFFFFFF


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix of ``x`` (int64 in [0, 2^32)): values in [0, 2^32) as int64.
    Every product stays below 2^59, so int64 arithmetic is exact."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def sample_keys(seed: int, layer: int, feat: Tensor, tok: Tensor) -> Tensor:
    """The sampling key of each (feature, token) of one layer: uniform-looking in [0, 2^32), as
    float64 (exact). ``feat, tok [n]`` int64 -> ``[n]`` float64."""
    h = hash32(torch.full_like(feat, (seed * 0x9E3779B1 + layer * 0x85EBCA77) & _M32))
    h = hash32(h ^ (feat & _M32))
    h = hash32(h ^ (tok & _M32))
    h = hash32(h ^ ((tok >> 32) & _M32))
    return h.double()


@dataclass
class Selection:
    """The K smallest ``(key, tok)`` entries of every feature, with their activation."""

    key: Tensor  # [d_sae, K] float64, +inf where empty; each row sorted ascending by (key, tok)
    tok: Tensor  # [d_sae, K] int64 global token id (row * ctx + pos), EMPTY_TOK where empty
    act: Tensor  # [d_sae, K] float32 activation of the feature at that token (0 where empty)

    @classmethod
    def empty(cls, d_sae: int, k: int) -> "Selection":
        return cls(torch.full((d_sae, k), float("inf"), dtype=torch.float64),
                   torch.full((d_sae, k), EMPTY_TOK, dtype=torch.int64),
                   torch.zeros(d_sae, k, dtype=torch.float32))

    @property
    def k(self) -> int:
        return self.key.shape[1]

    BYTES_PER_SLOT = 8 + 8 + 4  # key, tok, act

    def update(self, feat: Tensor, key: Tensor, tok: Tensor, act: Tensor) -> None:
        """Add the entries ``feat, key, tok, act [n]``: a (feat, tok) pair at most once, in
        non-decreasing ``tok`` order (as a scan yields them; :meth:`merge` sorts first)."""
        if feat.numel() == 0:
            return
        k = self.k
        # entries that cannot enter: behind the K-th kept entry of their feature
        kth_key, kth_tok = self.key[feat, k - 1], self.tok[feat, k - 1]
        ok = (key < kth_key) | ((key == kth_key) & (tok < kth_tok))
        feat, key, tok, act = feat[ok], key[ok], tok[ok], act[ok]
        if feat.numel() == 0:
            return
        # lexicographic order (feat, key, tok): tok is sorted, so two stable sorts suffice
        o = torch.sort(key, stable=True).indices
        o = o[torch.sort(feat[o], stable=True).indices]
        feat, key, tok, act = feat[o], key[o], tok[o], act[o]
        uniq, inverse, counts = torch.unique_consecutive(feat, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(feat.numel()) - starts[inverse]
        keep = rank < k  # at most K new entries per feature can matter
        g, r = inverse[keep], rank[keep]
        n_u = uniq.numel()
        c_key = torch.full((n_u, k), float("inf"), dtype=torch.float64)
        c_tok = torch.full((n_u, k), EMPTY_TOK, dtype=torch.int64)
        c_act = torch.zeros(n_u, k, dtype=torch.float32)
        c_key[g, r], c_tok[g, r], c_act[g, r] = key[keep], tok[keep], act[keep]
        all_key = torch.cat([self.key[uniq], c_key], 1)  # [n_u, 2K], each half sorted by (key, tok)
        all_tok = torch.cat([self.tok[uniq], c_tok], 1)
        all_act = torch.cat([self.act[uniq], c_act], 1)
        o = torch.sort(all_key, dim=1, stable=True).indices
        s_key = all_key.gather(1, o)
        ties = (s_key[:, 1:] == s_key[:, :-1]) & torch.isfinite(s_key[:, 1:])
        if bool(ties.any()):  # equal keys across the halves: order those rows by tok too
            rows = ties.any(1)
            o2 = torch.sort(all_tok[rows], dim=1, stable=True).indices
            o2 = o2.gather(1, torch.sort(all_key[rows].gather(1, o2), dim=1, stable=True).indices)
            o[rows] = o2
        o = o[:, :k]
        self.key[uniq] = all_key.gather(1, o)
        self.tok[uniq] = all_tok.gather(1, o)
        self.act[uniq] = all_act.gather(1, o)

    def merge(self, other: "Selection") -> None:
        """Fold ``other`` (the same features, disjoint tokens) into this selection."""
        filled = torch.isfinite(other.key)
        feat = torch.arange(other.key.shape[0]).unsqueeze(1).expand_as(other.key)[filled]
        key, tok, act = other.key[filled], other.tok[filled], other.act[filled]
        o = torch.sort(tok, stable=True).indices
        self.update(feat[o], key[o], tok[o], act[o])

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.key": self.key, f"{prefix}.tok": self.tok, f"{prefix}.act": self.act}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], prefix: str) -> "Selection":
        return cls(t[f"{prefix}.key"], t[f"{prefix}.tok"], t[f"{prefix}.act"])
