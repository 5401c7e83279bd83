"""The statistics of a reconstruction: FVU sums, and percentiles of per-token counts.

The FVU (fraction of variance unexplained, 1 - explained variance) of a reconstruction
``r`` of ``y`` over tokens t and dimensions d is

    FVU = sum_t,d (r - y)^2 / sum_t,d (y - mean_t y)^2

(the mean taken per dimension over the tokens), accumulated in fp64 chunk by chunk. The same
sums serve :func:`cltrace.training.loop.evaluate` and :func:`cltrace.evaluation.evaluate_set`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class FVUSums:
    """Running fp64 sums for the FVU of one layer's reconstruction (see module doc)."""

    def __init__(self) -> None:
        self.err = 0.0  # sum of squared errors
        self.ss = 0.0  # sum of y^2
        self.s1: Tensor | float = 0.0  # per-dimension sum of y
        self.n = 0  # tokens

    def add(self, recon: Tensor, y: Tensor) -> None:
        """Add tokens: ``recon, y [T, d_model]``."""
        y = y.double()
        self.err += float((recon.double() - y).square().sum())
        self.ss += float(y.square().sum())
        self.s1 = self.s1 + y.sum(0)
        self.n += y.shape[0]

    @property
    def value(self) -> float:
        """The FVU of everything added (the variance floored at 1e-30)."""
        if not self.n:
            return float("nan")
        s1 = torch.as_tensor(self.s1, dtype=torch.float64)
        return self.err / max(self.ss - float((s1 ** 2).sum()) / self.n, 1e-30)


def percentiles(values: Tensor, qs: Sequence[float]) -> list[float]:
    """The ``qs`` quantiles (in [0, 1]) of ``values`` with linear interpolation between order
    statistics, as ``torch.quantile`` computes them (but without its size limit)."""
    v = values.flatten().double().sort().values
    n = v.numel()
    if n == 0:
        return [float("nan")] * len(qs)
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (v[hi] - v[lo]) * (pos - lo)))
    return out
