"""Statistics of a paired before/after measurement over a set of prompts.

For per-prompt changes ``d_i = after_i − before_i`` (i = 1..n):

* **mean change** ``mean(d)`` with a **percentile bootstrap interval**: ``n_resamples`` resamples
  of the n prompts with replacement (numpy's ``default_rng(seed)``, so a run is reproducible),
  the mean of each, and the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of those means
  (numpy's default linear interpolation).
* a **paired sign-flip permutation test** of "no effect" (the changes are symmetric about 0):
  the statistic is ``|mean(d)|``; under the null each ``d_i`` is as likely to have the other
  sign, so the p-value is the fraction of the 2^n sign vectors ``s`` with
  ``|mean(s · d)| >= |mean(d)|`` (two-sided). For n <= ``EXACT_MAX`` (12: 4096 vectors) every
  sign vector is enumerated (the exact p-value); above, ``n_resamples`` random sign vectors
  (seeded) give the Monte Carlo estimate ``(1 + hits) / (1 + n_resamples)``, which never
  reports 0. Chosen over Wilcoxon's signed-rank test because it tests the same quantity the
  interval describes (the mean change, in the metric's units) and has no ties to break.
  Ties with the observed statistic count as hits (within 1e-9 x max |d_i|, which absorbs
  rounding between sums taken in different orders).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

EXACT_MAX = 12  # sign flips enumerated up to this many prompts (2^12 = 4096)


@dataclass
class PairedSummary:
    """The mean change of a paired measurement, its bootstrap interval and the sign-flip test."""

    n: int
    mean_before: float
    mean_after: float
    mean_change: float
    ci_low: float
    ci_high: float
    level: float  # of the interval (0.95)
    n_resamples: int  # bootstrap resamples (and random sign vectors when not exact)
    seed: int
    p_value: float  # two-sided paired sign-flip permutation test of mean change 0
    p_exact: bool  # True: all 2^n sign vectors enumerated

    def to_dict(self) -> dict:
        return asdict(self) | {"test": "paired sign-flip permutation test, two-sided, |mean change|",
                               "interval": "percentile bootstrap over prompts"}


def bootstrap_interval(d, n_resamples: int = 10_000, seed: int = 0, level: float = 0.95):
    """(low, high): the percentile bootstrap interval of ``mean(d)`` (``d [n]``)."""
    d = np.asarray(d, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_resamples, d.size))  # [B, n]
    means = d[idx].mean(1)  # [B]
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def all_signs(n: int) -> np.ndarray:
    """Every sign vector of length n: [2^n, n] of ±1 (row k: bit j of k set -> -1 at j)."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None]) & 1
    return 1 - 2 * bits.astype(np.float64)


def sign_flip_p(d, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, bool]:
    """(p-value, exact) of the two-sided paired sign-flip test of ``mean(d) = 0`` (module doc)."""
    d = np.asarray(d, dtype=np.float64)
    obs = abs(d.mean())
    tol = 1e-9 * float(np.abs(d).max(initial=0.0))  # rounding of sums in other orders
    if d.size <= EXACT_MAX:
        stats = np.abs(all_signs(d.size) @ d) / d.size  # [2^n]
        return float((stats >= obs - tol).mean()), True
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_resamples, d.size))
    hits = int((np.abs(signs @ d) / d.size >= obs - tol).sum())
    return (1 + hits) / (1 + n_resamples), False


def paired_summary(before, after, n_resamples: int = 10_000, seed: int = 0,
                   level: float = 0.95) -> PairedSummary:
    """The :class:`PairedSummary` of per-prompt values ``before [n]`` and ``after [n]``."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    d = a - b
    lo, hi = bootstrap_interval(d, n_resamples, seed, level)
    p, exact = sign_flip_p(d, n_resamples, seed)
    return PairedSummary(int(d.size), float(b.mean()), float(a.mean()), float(d.mean()), lo, hi,
                         level, int(n_resamples), int(seed), p, exact)
