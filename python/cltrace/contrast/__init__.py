"""``cltrace contrast``: which features tell two sets of prompts apart.

Modules: :mod:`.sets` (the two sets, checked before tracing), :mod:`.collect` (per prompt and
feature: activation, influence, kept, from the batch's graphs and manifest), :mod:`.stats`
(Hedges' g, permutation p-values, Benjamini-Hochberg q-values), :mod:`.analyze` (the ranked
table), :mod:`.common` (a set's common circuit as one graph), :mod:`.pairs` (minimal pairs:
the checks before tracing, each pair's difference graph), :mod:`.report` (the files).
Tracing itself is ``cltrace batch``'s runner, called by the command."""
from .analyze import ContrastSettings, contrast
from .collect import FeatureTable, collect
from .common import common_circuit
from .report import build_report
from .stats import bh_qvalues, hedges_g, permutation_p

__all__ = ["ContrastSettings", "FeatureTable", "bh_qvalues", "build_report", "collect", "common_circuit",
           "contrast", "hedges_g", "permutation_p"]
