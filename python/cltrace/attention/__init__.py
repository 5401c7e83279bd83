"""Attention in the graph: which heads carry an edge, and what made them attend there.

:mod:`.loadings` splits an edge by the heads its paths cross; :mod:`.maps` writes each head's
query and key as linear maps of the residual stream (frozen norms, RoPE); :mod:`.qk` splits a
head's score into pairs of query-side and key-side sources; :mod:`.explain` does both for a
pruned graph (``cltrace attribute --qk``). The method: docs/method.md, "Attention".
"""
from .explain import AttentionReport, Contributor, explain_attention, qk_attribution
from .loadings import HeadLoadings
from .qk import QKDecomposition, QKTrace
from .settings import QKSettings

__all__ = ["AttentionReport", "Contributor", "HeadLoadings", "QKDecomposition", "QKSettings", "QKTrace",
           "explain_attention", "qk_attribution"]
