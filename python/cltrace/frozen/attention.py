"""Frozen attention patterns, dense or banded, and the two products the linear model needs.

A global-attention layer keeps its pattern dense, ``[n_heads, n_pos, n_pos]``. A sliding-window
layer (Gemma 3: 5 of every 6 layers, window W = 512 keys including the query's own) has its
nonzero entries in the band ``q - W < k <= q``, so, once the prompt is long enough for that to
save memory, it is stored by query blocks of Bq rows (Bq = 128):

    blocks[b, h, i, j] = P[h, b·Bq + i, b·Bq - W + j]      # [n_blocks, n_heads, Bq, Bq + W]

((Bq + W)·n_pos numbers per head instead of n_pos²: 1/6 at 4096 tokens), and both products
below touch only the band, so their cost is linear in n_pos instead of quadratic.

* :func:`mix`   (forward):  ``z[h, q] = Σ_k P[h, q, k] v[g(h), k]``
* :func:`mix_t` (backward, per KV group g, batched over seeds b):
  ``grad_v[b, k] = Σ_{h∈g} Σ_q s_q[q] P[h, q, k] s_k[k] gz[b, q, h]``

with ``g(h) = h // rep`` the KV group of head h (GQA), positions restricted to a window
``[start, n)``, and ``s_q``, ``s_k`` frozen norm scales folded into the pattern.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


class BandedPattern:
    """The pattern of a sliding-window layer stored by query blocks (see the module doc)."""

    def __init__(self, blocks: Tensor, n_pos: int, window: int):
        self.blocks, self.n_pos, self.window = blocks, n_pos, window  # [nb, H, Bq, Bq + W]
        self.block = blocks.shape[2]

    @staticmethod
    def block_rows(window: int) -> int:
        """Query rows per block: small enough that a block is mostly band (Bq + W keys)."""
        return max(1, min(window, 128))

    @classmethod
    def saves_memory(cls, n: int, window: int) -> bool:
        """Whether the banded form of an ``n``-position pattern is smaller than the dense one."""
        Bq = cls.block_rows(window)
        return -(-n // Bq) * Bq * (Bq + window) < n * n

    @classmethod
    def from_dense(cls, P: Tensor, window: int, block: Optional[int] = None) -> "BandedPattern":
        """Keep the band of ``P [n_heads, n, n]`` in blocks of ``block`` query rows (default
        :meth:`block_rows`); raise if probability mass lies outside the band."""
        H, n, _ = P.shape
        W, Bq = window, block or cls.block_rows(window)
        nb = -(-n // Bq)
        padded = P.new_zeros(H, nb * Bq, nb * Bq + W)  # key k at column k + W
        padded[:, :n, W:W + n] = P
        blocks = torch.stack([padded[:, b * Bq:(b + 1) * Bq, b * Bq:b * Bq + Bq + W] for b in range(nb)])
        kept = blocks.sum(dim=(2, 3), dtype=torch.float64).sum(0)  # [H]
        total = P.sum(dim=(1, 2), dtype=torch.float64)
        if not torch.allclose(kept, total, rtol=1e-5, atol=1e-6 * n):
            raise ValueError(f"attention pattern has mass outside its sliding window of {W} keys")
        return cls(blocks.contiguous(), n, W)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.blocks.shape[1], self.n_pos, self.n_pos)

    def to(self, dtype: torch.dtype) -> "BandedPattern":
        return BandedPattern(self.blocks.to(dtype), self.n_pos, self.window)

    def dense(self) -> Tensor:
        """``[n_heads, n_pos, n_pos]`` (tests and small prompts)."""
        nb, H, Bq, _ = self.blocks.shape
        W = self.window
        out = self.blocks.new_zeros(H, nb * Bq, nb * Bq + W)
        for b in range(nb):
            out[:, b * Bq:(b + 1) * Bq, b * Bq:b * Bq + Bq + W] = self.blocks[b]
        return out[:, :self.n_pos, W:W + self.n_pos]

    def _block(self, b: int, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        """``P[:, q0:q1, k0:k1]`` for queries inside block b and keys inside its band."""
        Bq, W = self.block, self.window
        return self.blocks[b][:, q0 - b * Bq:q1 - b * Bq, k0 - (b * Bq - W):k1 - (b * Bq - W)]

    def _query_blocks(self, start: int, n: int):
        """(b, q0, q1, k0, k1) for every query block meeting [start, n): its queries and keys."""
        Bq, W = self.block, self.window
        for b in range(start // Bq, -(-n // Bq)):
            q0, q1 = max(start, b * Bq), min(n, (b + 1) * Bq)
            yield b, q0, q1, max(start, b * Bq - W + 1), q1


Pattern = Union[Tensor, BandedPattern]


def as_dense(P: Pattern) -> Tensor:
    return P.dense() if isinstance(P, BandedPattern) else P


def entries(P: Pattern, q: Tensor, k: Tensor) -> Tensor:
    """``P[:, q[e], k[e]]`` for E (query, key) pairs: ``[E, n_heads]``, read from the band of a
    sliding-window pattern without forming the dense one (zero outside the band)."""
    dev = P.blocks.device if isinstance(P, BandedPattern) else P.device
    q, k = q.to(dev), k.to(dev)
    if not isinstance(P, BandedPattern):
        return P[:, q, k].T
    Bq, W = P.block, P.window
    b = q // Bq
    j = k - b * Bq + W  # the key's column in its query block
    inside = (j >= 0) & (j < Bq + W)
    vals = P.blocks[b, :, q - b * Bq, j.clamp(0, Bq + W - 1)]  # [E, H]
    return vals * inside[:, None]


def pattern_rows(P: Pattern, head: int, queries: Tensor) -> Tensor:
    """``P[head, queries, :]``: ``[len(queries), n_pos]`` (any pattern, banded included)."""
    n = P.shape[1]
    q = queries.repeat_interleave(n)
    k = torch.arange(n, device=queries.device).repeat(len(queries))
    return entries(P, q, k)[:, head].view(len(queries), n)


def mix(P: Pattern, v: Tensor, start: int = 0, s_q: Optional[Tensor] = None,
        s_k: Optional[Tensor] = None) -> Tensor:
    """Attention of values ``v [n_kv, n - start, C]`` at positions ``start .. n-1`` (queries and
    keys): ``[n_kv, rep, n - start, C]``. With ``s_q``, ``s_k [n_pos]`` (indexed by absolute
    position) the pattern is scaled to ``s_q[q] P[h, q, k] s_k[k]``."""
    n_kv, m, C = v.shape
    n = start + m
    H = P.shape[0]
    rep = H // n_kv

    def scaled(A: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        return A if s_q is None else A * s_q[q0:q1, None] * s_k[None, k0:k1]

    if not isinstance(P, BandedPattern):
        A = scaled(P[:, start:n, start:n], start, n, start, n)
        return A.reshape(n_kv, rep, m, m) @ v[:, None]
    z = v.new_zeros(n_kv, rep, m, C)
    for b, q0, q1, k0, k1 in P._query_blocks(start, n):
        A = scaled(P._block(b, q0, q1, k0, k1), q0, q1, k0, k1).reshape(n_kv, rep * (q1 - q0), k1 - k0)
        z[:, :, q0 - start:q1 - start] = (A @ v[:, k0 - start:k1 - start]).view(n_kv, rep, q1 - q0, C)
    return z


def mix_t(P: Pattern, gz: Tensor, s_q: Tensor, s_k: Tensor, group: int = 0, rep: int = 1,
          start: int = 0) -> tuple[Tensor, Tensor]:
    """The transposed product of KV group ``group`` (heads ``group·rep ..``) for the queries
    ``start .. n-1``, with norm scales folded in.

    ``gz [k, (n - start) * rep, C]`` (k seeds; rows: query, then the group's head; may be a
    strided view), ``s_q``, ``s_k [n]`` (by absolute position):
    ``grad_v[b, j] = Σ_{h∈group, q ≥ start} s_q[q] P[h, q, j] s_k[j] gz[b, (q, h)]`` for every
    key j < n: one scaled pattern matrix applied to every seed (a batched GEMM). Returned as
    ``(keys start .. n-1 [k, n - start, C], keys 0 .. start-1 [k, start, C])``, each contiguous."""
    B, nr, C = gz.shape
    nq = nr // rep
    n = start + nq
    heads = slice(group * rep, (group + 1) * rep)

    def scaled_t(A: Tensor, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        # [rep, nq, nk] -> [nk, nq * rep] with columns (query, head)
        A = A[heads] * s_q[q0:q1, None] * s_k[None, k0:k1]
        return A.permute(2, 1, 0).reshape(k1 - k0, (q1 - q0) * rep)

    if not isinstance(P, BandedPattern):
        At = scaled_t(P[:, start:n, :n], start, n, 0, n)  # [n, nq * rep]
        return torch.matmul(At[start:], gz), torch.matmul(At[:start], gz)
    main, pre = gz.new_zeros(B, nq, C), gz.new_zeros(B, start, C)
    Bq, W = P.block, P.window
    for b in range(start // Bq, -(-n // Bq)):
        q0, q1 = max(start, b * Bq), min(n, (b + 1) * Bq)
        k0 = max(0, b * Bq - W + 1)
        At = scaled_t(P._block(b, q0, q1, k0, q1), q0, q1, k0, q1)  # [q1 - k0, (q1 - q0) * rep]
        rows = gz[:, (q0 - start) * rep:(q1 - start) * rep]
        split = min(max(start, k0), q1)  # keys below it are the prefix's
        if split > k0:
            pre[:, k0:split] += torch.matmul(At[:split - k0], rows)
        main[:, split - start:q1 - start] += torch.matmul(At[split - k0:], rows)
    return main, pre
