"""The bounded per-feature state a corpus scan keeps: what every feature page is made from.

For every feature f of every layer (an activation "fires" when the encoder's output is > 0):

* ``count[f]`` firings, ``act_min[f]``/``act_max[f]``                                 EXACT
* ``top``: the K largest activations as (token, activation), ties by token id          EXACT
* ``sample``: S firings chosen uniformly at random (bottom-S of a 32-bit hash of
  (seed, layer, f, token)): deterministic per seed, the same sample whatever the order     EXACT
* ``hist[f]``: counts of non-zero activations in log-spaced bins ``[LO * R^b, LO * R^(b+1))``,
  ``LO = 2^-6``, ``R = 2^(1/12)``, 240 bins up to 2^14 (values outside go to the end bins) EXACT
  Quantile values and the viewer's linear histogram are read from it: APPROXIMATE, to
  within one bin (a factor R = 1.059, i.e. about +-3 % around the bin's geometric centre).

All of it merges exactly across shards (sums, min/max, and the two selections), so a sharded
run equals one pass; memory is fixed by the number of features, not the corpus:
``bytes_per_feature`` = (K + S) slots x 20 B + 240 x 4 B + 16 B (1,776 B at K = S = 20):
a 262k-wide set on 18 layers (4.72 M features) needs 8.4 GB (7.8 GiB) whatever the number of
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from .selection import Selection, sample_keys

HIST_LO_LOG2 = -6.0  # first bin edge: 2^-6
HIST_BINS_PER_OCTAVE = 12
HIST_BINS = 240  # 20 octaves: up to 2^14


def hist_bin(act: Tensor) -> Tensor:
    """Log-spaced histogram bin of each activation ``act [n] (> 0)``: ``[n]`` int64."""
    b = torch.floor((torch.log2(act.double()) - HIST_LO_LOG2) * HIST_BINS_PER_OCTAVE)
    return b.clamp_(0, HIST_BINS - 1).long()


def hist_edges() -> Tensor:
    """The ``HIST_BINS + 1`` bin edges (float64)."""
    return torch.exp2(HIST_LO_LOG2 + torch.arange(HIST_BINS + 1, dtype=torch.float64) / HIST_BINS_PER_OCTAVE)


def bytes_per_feature(top_k: int, n_samples: int) -> int:
    return (top_k + n_samples) * Selection.BYTES_PER_SLOT + HIST_BINS * 4 + 8 + 4 + 4


@dataclass
class LayerState:
    """The state of the features of one layer."""

    count: Tensor  # [d_sae] int64 firings
    act_min: Tensor  # [d_sae] float32 (+inf before the first firing)
    act_max: Tensor  # [d_sae] float32 (0 before the first firing)
    hist: Tensor  # [d_sae, HIST_BINS] int32 log-spaced histogram of the activations
    top: Selection  # K largest activations (key -act)
    sample: Selection  # S firings sampled uniformly (key hash)

    @classmethod
    def empty(cls, d_sae: int, top_k: int, n_samples: int) -> "LayerState":
        return cls(torch.zeros(d_sae, dtype=torch.int64),
                   torch.full((d_sae,), float("inf"), dtype=torch.float32),
                   torch.zeros(d_sae, dtype=torch.float32),
                   torch.zeros(d_sae, HIST_BINS, dtype=torch.int32),
                   Selection.empty(d_sae, top_k), Selection.empty(d_sae, n_samples))

    @property
    def d_sae(self) -> int:
        return self.count.numel()

    def update(self, feat: Tensor, act: Tensor, tok: Tensor, seed: int, layer: int) -> None:
        """Add firings ``feat, act, tok [n]`` (each (feat, tok) at most once; act > 0)."""
        if feat.numel() == 0:
            return
        act = act.float()
        self.count += torch.bincount(feat, minlength=self.d_sae)
        self.act_min.scatter_reduce_(0, feat, act, "amin")
        self.act_max.scatter_reduce_(0, feat, act, "amax")
        flat = feat * HIST_BINS + hist_bin(act)
        self.hist.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        self.top.update(feat, -act.double(), tok, act)
        self.sample.update(feat, sample_keys(seed, layer, feat, tok), tok, act)

    def merge(self, other: "LayerState") -> None:
        self.count += other.count
        torch.minimum(self.act_min, other.act_min, out=self.act_min)
        torch.maximum(self.act_max, other.act_max, out=self.act_max)
        self.hist += other.hist
        self.top.merge(other.top)
        self.sample.merge(other.sample)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.count": self.count, f"{prefix}.act_min": self.act_min,
                f"{prefix}.act_max": self.act_max, f"{prefix}.hist": self.hist,
                **self.top.tensors(f"{prefix}.top"), **self.sample.tensors(f"{prefix}.sample")}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], prefix: str) -> "LayerState":
        return cls(t[f"{prefix}.count"], t[f"{prefix}.act_min"], t[f"{prefix}.act_max"],
                   t[f"{prefix}.hist"], Selection.from_tensors(t, f"{prefix}.top"),
                   Selection.from_tensors(t, f"{prefix}.sample"))


@dataclass
class FeatureState:
    """The scan state of every layer, plus what it was made with (for merging and resuming).

    ``ctx`` is the row length the token ids ``tok = row * ctx + pos`` refer to; ``n_tokens``
    counts the (non-BOS) tokens seen, the denominator of the activation frequency."""

    layers: dict[int, LayerState]
    ctx: int
    top_k: int = 20
    n_samples: int = 20
    seed: int = 0
    n_tokens: int = 0
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, d_sae: dict[int, int], ctx: int, top_k: int = 20, n_samples: int = 20,
              seed: int = 0) -> "FeatureState":
        return cls({L: LayerState.empty(d, top_k, n_samples) for L, d in sorted(d_sae.items())},
                   ctx, top_k, n_samples, seed)

    def update(self, layer: int, feat: Tensor, act: Tensor, tok: Tensor) -> None:
        self.layers[layer].update(feat, act, tok, self.seed, layer)

    def merge(self, other: "FeatureState") -> "FeatureState":
        """Fold the state of a disjoint shard of the same corpus into this one (in place)."""
        same = (self.ctx, self.top_k, self.n_samples, self.seed, sorted(self.layers))
        theirs = (other.ctx, other.top_k, other.n_samples, other.seed, sorted(other.layers))
        if same != theirs:
            raise ValueError(f"cannot merge feature states made with different settings: "
                             f"(ctx, top_k, n_samples, seed, layers) {same} vs {theirs}")
        for L, st in self.layers.items():
            st.merge(other.layers[L])
        self.n_tokens += other.n_tokens
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for L, st in self.layers.items():
            out.update(st.tensors(f"L{L}"))
        return out

    def save(self, path) -> None:
        """Write atomically (readers see the old file or the whole new one)."""
        from ..atomic import atomic_path
        from pathlib import Path

        head = dict(ctx=self.ctx, top_k=self.top_k, n_samples=self.n_samples, seed=self.seed,
                    n_tokens=self.n_tokens, meta=self.meta, layers=sorted(self.layers))
        with atomic_path(Path(path)) as tmp:
            torch.save({"head": head, "tensors": self.tensors()}, tmp)

    @classmethod
    def load(cls, path) -> "FeatureState":
        blob = torch.load(path, map_location="cpu", weights_only=True)
        h, t = blob["head"], blob["tensors"]
        layers = {L: LayerState.from_tensors(t, f"L{L}") for L in h["layers"]}
        return cls(layers, h["ctx"], h["top_k"], h["n_samples"], h["seed"], h["n_tokens"], h["meta"])


def merge_states(states: Iterable[FeatureState]) -> FeatureState:
    """One state from the states of disjoint shards (the first is updated in place)."""
    it = iter(states)
    out = next(it)
    for s in it:
        out.merge(s)
    return out


def quantile_values(hist: Tensor, act_min: float, act_max: float, n: int = 100) -> list[float]:
    """The ``i/n`` quantiles (i = 1..n) of one feature's activations from its log histogram
    ``hist [HIST_BINS]``: geometric interpolation inside the bin, clamped to [min, max]; the
    last is ``act_max`` exactly. Approximate to within one bin."""
    counts = hist.numpy().astype(np.float64)
    total = counts.sum()
    if total == 0:
        return []
    cum = np.cumsum(counts)
    target = total * np.arange(1, n + 1) / n
    b = np.minimum(np.searchsorted(cum, target), HIST_BINS - 1)  # first bin with cum >= target
    c = counts[b]
    frac = np.clip(np.where(c > 0, (target - (cum[b] - c)) / np.where(c > 0, c, 1), 1.0), 0.0, 1.0)
    lo = np.exp2(HIST_LO_LOG2 + b / HIST_BINS_PER_OCTAVE)
    v = np.clip(lo * np.exp2(frac / HIST_BINS_PER_OCTAVE), act_min, act_max)
    v[-1] = act_max
    return v.tolist()


def linear_histogram(hist: Tensor, act_min: float, act_max: float, n_bins: int = 32) -> list[int]:
    """The viewer's histogram: counts in ``n_bins`` equal bins over [act_min, act_max], each
    log bin's count placed at its geometric centre (clamped to [min, max]). Approximate."""
    h = hist.numpy()
    nz = np.nonzero(h)[0]
    centre = np.clip(np.exp2(HIST_LO_LOG2 + (nz + 0.5) / HIST_BINS_PER_OCTAVE), act_min, act_max)
    width = act_max - act_min
    i = (np.full(nz.shape, n_bins - 1) if width <= 0 else
         np.minimum(n_bins - 1, ((centre - act_min) / width * n_bins).astype(np.int64)))
    return np.bincount(i, weights=h[nz], minlength=n_bins).astype(np.int64).tolist()
