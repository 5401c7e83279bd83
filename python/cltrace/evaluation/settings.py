"""What ``cltrace eval`` measures on: how many tokens, in rows of what length, how many rows
per pass, which layers, and what counts as a dense feature.

The one source of these defaults, for :func:`cltrace.evaluation.evaluate_set`, the options of
``cltrace eval`` and the ``settings`` its JSON records.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError
from ..settings import flag_of, option, parse_layers


def _layer_tuple(text: str) -> tuple:
    layers = parse_layers(text)
    if not layers:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; use e.g. '0-5,9'")
    return tuple(layers)


@dataclass(frozen=True)
class EvalSettings:
    """How a dictionary set is evaluated (docs/method.md, "Evaluating a dictionary")."""

    tokens: int = option(4096, "tokens of the corpus evaluated (<bos> not counted)", metavar="N")
    ctx: int = option(128, "tokens per row (the sequence length, <bos> included)", metavar="N")
    batch: int = option(8, "rows per forward pass", metavar="N")
    dense_threshold: float = option(0.1, "a feature firing on more than this fraction of the "
                                    "evaluated tokens counts as dense", metavar="F")
    layers: Optional[tuple] = option(None, "layers to evaluate, e.g. '0-5,9'", metavar="LIST",
                                     type=_layer_tuple, default_text="every layer of the set")

    def check(self) -> "EvalSettings":
        """Raise a UsageError naming the option of a value out of range."""
        cls = type(self)
        for name, low in (("tokens", 1), ("ctx", 2), ("batch", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise UsageError(f"{flag_of(cls, name)} must be an integer >= {low}, got "
                                 f"{getattr(self, name)!r}")
        t = self.dense_threshold
        if not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            raise UsageError(f"{flag_of(cls, 'dense_threshold')} must be a fraction in [0, 1), "
                             f"got {t!r}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise UsageError(f"{flag_of(cls, 'layers')} must list layers >= 0, got {self.layers!r}")
        return self
