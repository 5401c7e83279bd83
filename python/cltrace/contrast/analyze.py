"""The ranked comparison of two sets: per feature, means, kept shares, effect sizes, permutation
p-values and Benjamini-Hochberg q-values of its activation and of its influence."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..export.neuronpedia import cantor_pair
from ..settings import option
from .collect import FeatureTable
from .stats import bh_qvalues, hedges_g, min_attainable_p, permutation_p, relabellings

MEASURES = ("activation", "influence")


@dataclass(frozen=True)
class ContrastSettings:
    """How two sets are compared: the one source of these defaults, for :func:`contrast`,
    :func:`cltrace.contrast.build_report` and the options of ``cltrace contrast``."""

    by: str = option("activation", "the measure that ranks the features", choices=MEASURES)
    n_perm: int = option(10000, "relabellings of the permutation test (every one, exact, when "
                         "there are at most N)", metavar="N", flag="--permutations")
    seed: int = option(0, "seed of the relabellings")
    min_count: int = option(2, "test the features kept in at least K graphs of the two sets",
                            metavar="K")
    alpha: float = option(0.05, "q-value called significant")
    min_share: float = option(0.5, "common circuit: nodes and edges in at least this share of a "
                              "set's graphs", metavar="S")

    def check(self) -> "ContrastSettings":
        """``self``, or a UsageError naming the option out of range."""
        if self.n_perm < 1:
            raise UsageError(f"--permutations must be >= 1, got {self.n_perm}")
        if not 0 < self.alpha < 1 or not 0 < self.min_share <= 1:
            raise UsageError("--alpha must be in (0, 1) and --min-share in (0, 1]")
        return self


def _num(x: float):
    """A JSON number; +-inf (a constant set against another) as the string "inf"/"-inf"."""
    x = float(x)
    return x if np.isfinite(x) else ("inf" if x > 0 else "-inf")


def contrast(table: FeatureTable, names: tuple[str, str], settings: ContrastSettings = ContrastSettings()) -> dict:
    """The contrast of set A (``table.sets == 0``) against set B as a JSON-ready dict:
    ``features`` ranked by the q-value, then the p-value of ``settings.by``, then |g|, then
    |difference of means|."""
    order = np.argsort(table.sets, kind="stable")  # set A's rows first
    sets = table.sets[order]
    n_a, n_b = int((sets == 0).sum()), int((sets == 1).sum())
    count = table.kept.sum(0)
    tested = np.flatnonzero(count >= settings.min_count) if n_a and n_b else np.array([], int)
    stats = {}
    drawn = relabellings(n_a, n_b, settings.n_perm, settings.seed) if len(tested) else None  # both measures
    for m in MEASURES:
        x = getattr(table, m)[order][:, tested]  # [n, T]
        diff, g = hedges_g(x, n_a) if len(tested) and n_a > 1 and n_b > 1 else (np.zeros(len(tested)),) * 2
        p = permutation_p(x, n_a, settings.n_perm, settings.seed, drawn=drawn) if len(tested) else np.zeros(0)
        stats[m] = dict(mean_a=x[:n_a].mean(0) if n_a else diff, mean_b=x[n_a:].mean(0) if n_b else diff,
                        diff=diff, g=g, p=p, q=bh_qvalues(p))
    kept = table.kept[order][:, tested]
    share_a, share_b = kept[:n_a].mean(0) if n_a else np.zeros(len(tested)), kept[n_a:].mean(0) if n_b else np.zeros(len(tested))
    s = stats[settings.by]
    rank = sorted(range(len(tested)), key=lambda j: (s["q"][j], s["p"][j], -abs(s["g"][j]),
                                                     -abs(s["diff"][j]), table.keys[tested[j]]))
    rows = []
    for j in rank:
        layer, feat = table.keys[tested[j]]
        row = {"layer": layer, "feature": feat, "id": cantor_pair(layer, feat),
               "label": table.labels.get((layer, feat), ""),
               "kept_share": [float(share_a[j]), float(share_b[j])], "count": int(count[tested[j]])}
        for m in MEASURES:
            st = stats[m]
            row[m] = {"mean": [float(st["mean_a"][j]), float(st["mean_b"][j])], "diff": float(st["diff"][j]),
                      "g": _num(st["g"][j]), "p": float(st["p"][j]), "q": float(st["q"][j])}
        row["significant"] = row[settings.by]["q"] <= settings.alpha
        rows.append(row)
    return {"format": "cltrace.contrast/1", "sets": [
                {"name": names[0], "prompts": [table.slugs[i] for i in order[:n_a]]},
                {"name": names[1], "prompts": [table.slugs[i] for i in order[n_a:]]}],
            "settings": {"by": settings.by, "n_perm": settings.n_perm, "seed": settings.seed,
                         "min_count": settings.min_count, "alpha": settings.alpha,
                         "exact": bool(n_a and n_b) and math.comb(n_a + n_b, n_a) <= settings.n_perm,
                         "min_p": min_attainable_p(n_a, n_b, settings.n_perm) if n_a and n_b else 1.0},
            "n_features": len(table.keys), "n_tested": int(len(tested)),
            "n_significant": sum(r["significant"] for r in rows), "features": rows}
