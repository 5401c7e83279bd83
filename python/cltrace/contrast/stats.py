"""The statistics of a contrast between two sets of prompts, for many features at once.

Values are a matrix ``X [n_A + n_B, F]`` (the rows of set A first), one column per feature.

* effect size: the difference of means ``mean_A - mean_B`` and Hedges' g (Cohen's d with the
  pooled standard deviation, times the small-sample correction ``1 - 3 / (4 (n_A + n_B) - 9)``);
  g is ``inf`` (signed) when both sets are constant and differ, 0 when they are equal.
* permutation test, two-sided, on the difference of means: the statistic of every relabelling
  of the prompts into sets of sizes n_A and n_B. Exact when ``C(n_A + n_B, n_A) <= n_perm``:
  ``p = #{relabellings with |d| >= |d_obs|} / C`` (the observed one included); otherwise
  ``n_perm`` random relabellings from a seeded generator: ``p = (1 + #{|d| >= |d_obs|}) /
  (1 + n_perm)``. Ties are counted with a relative tolerance of 1e-9 (float sums of the same
  numbers in another order).
* Benjamini-Hochberg: ``q_(i) = min_{j >= i} m p_(j) / j`` over the m p-values sorted
  ascending, capped at 1.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

TIE = 1e-9  # relative tolerance of |d| >= |d_obs|


def hedges_g(x: np.ndarray, n_a: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean_A - mean_B, Hedges' g) per column of ``x [n, F]``."""
    a, b = x[:n_a], x[n_a:]
    n_b = len(b)
    diff = a.mean(0) - b.mean(0)
    var = ((n_a - 1) * a.var(0, ddof=1) + (n_b - 1) * b.var(0, ddof=1)) / (n_a + n_b - 2)
    sd = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(sd > 1e-12 * np.maximum(1.0, np.abs(diff)), diff / sd,
                     np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
    return diff, g * (1 - 3 / (4 * (n_a + n_b) - 9))


def relabellings(n_a: int, n_b: int, n_perm: int, seed: int = 0) -> tuple[np.ndarray, bool]:
    """(0/1 matrix [P, n_A + n_B] of set-A memberships, exact): every relabelling when there
    are at most ``n_perm`` of them (exact), else ``n_perm`` random ones (seeded)."""
    n = n_a + n_b
    if math.comb(n, n_a) <= n_perm:
        rows = np.zeros((math.comb(n, n_a), n))
        for i, idx in enumerate(itertools.combinations(range(n), n_a)):
            rows[i, list(idx)] = 1.0
        return rows, True
    rng = np.random.default_rng(seed)
    rows = np.zeros((n_perm, n))
    for i in range(n_perm):
        rows[i, rng.permutation(n)[:n_a]] = 1.0
    return rows, False


def permutation_p(x: np.ndarray, n_a: int, n_perm: int = 10000, seed: int = 0,
                  chunk: int = 4096, drawn: tuple | None = None) -> np.ndarray:
    """Two-sided permutation p-values of the difference of means, per column of ``x [n, F]``
    (see the module docstring); ``drawn``: :func:`relabellings`' result for these arguments,
    when the caller tests several tables of the same prompts."""
    n, n_feat = x.shape
    n_b = n - n_a
    rows, exact = drawn if drawn is not None else relabellings(n_a, n_b, n_perm, seed)
    total = x.sum(0)  # [F]
    obs = np.abs(x[:n_a].sum(0) / n_a - x[n_a:].sum(0) / n_b)
    tol = TIE * np.maximum(np.abs(x).max(0, initial=0.0), 1e-300)
    hits = np.zeros(n_feat)
    for s in range(0, len(rows), chunk):
        in_a = rows[s:s + chunk] @ x  # [P, F]: sums over the relabelled set A
        d = np.abs(in_a / n_a - (total - in_a) / n_b)
        hits += (d >= obs - tol).sum(0)
    return hits / len(rows) if exact else (1 + hits) / (1 + len(rows))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values of ``p [m]`` (in the order given)."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    q = np.empty(m)
    q[order] = q_sorted
    return q


def min_attainable_p(n_a: int, n_b: int, n_perm: int) -> float:
    """The smallest p-value the test can give for these set sizes (the observed split and,
    when n_A = n_B, its mirror always count)."""
    c = math.comb(n_a + n_b, n_a)
    mirror = 2 if n_a == n_b else 1
    return mirror / c if c <= n_perm else 1 / (1 + n_perm)
