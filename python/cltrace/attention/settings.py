"""What ``--qk`` explains: how many heads are traced and how much of each split is written.

The one source of these defaults, for :func:`cltrace.attention.explain_attention`, the options
of ``cltrace attribute`` / ``batch`` and the ``attention_settings`` a graph records.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from ..errors import UsageError
from ..settings import flag_of, option


def parse_traces(text: str) -> tuple:
    """'5.1@8:3,2.0@8:0' -> ((5, 1, 8, 3), (2, 0, 8, 0)): (layer, head, query position, key
    position) per trace (an argparse ``type``)."""
    out = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+)\.(\d+)@(\d+):(\d+)", part)
        if not m:
            raise argparse.ArgumentTypeError(f"bad trace {part!r}; write LAYER.HEAD@QUERY:KEY, e.g. 5.1@8:3")
        out.append(tuple(int(g) for g in m.groups()))
    return tuple(out)


@dataclass(frozen=True)
class QKSettings:
    """Head loadings and QK attribution of one graph."""

    qk: bool = option(False, "explain attention: split every kept link by the heads that carry "
                      "it, and trace the scores of the heads that carry the top edges into the "
                      "most influential nodes (QK attribution; docs/method.md)")
    qk_nodes: int = option(4, "trace the heads of the top edges into this many nodes (the most "
                           "probable logit, then the kept features by influence)", metavar="N")
    qk_edges: int = option(2, "edges per node whose main head is traced", metavar="K")
    qk_trace: tuple = option((), "trace these heads as well: LAYER.HEAD@QUERY:KEY[,...] "
                             "(positions count from 0; KEY <= QUERY, or after it among the soft "
                             "tokens of the query's image)", metavar="L.H@Q:K", type=parse_traces,
                             default_text="none")
    qk_pairs: int = option(12, "pair-wise contributors written per trace", metavar="N")
    qk_marginals: int = option(10, "marginal contributors written per side of a trace", metavar="N")
    link_heads: int = option(8, "one-hop heads listed on each link (the rest summed)", metavar="N")

    def check(self) -> "QKSettings":
        """Raise a UsageError naming the option of a value out of range."""
        for name in ("qk_nodes", "qk_edges", "qk_pairs", "qk_marginals", "link_heads"):
            if getattr(self, name) < 0:
                raise UsageError(f"{flag_of(type(self), name)} ({name}) must be >= 0, got {getattr(self, name)}")
        return self
