"""What an attribution computes: the targets and how many features it visits.

The one source of these defaults, for :func:`cltrace.attribution.attribute`, the command-line
options of ``cltrace attribute`` / ``batch`` and the ``generation_settings`` a graph records.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError
from ..settings import flag_of, option


def feature_count(text: str) -> Optional[int]:
    """'all' -> None (every active feature), else the int (an argparse ``type``; its range is
    :meth:`AttributionSettings.check`'s)."""
    return None if text == "all" else int(text)


@dataclass(frozen=True)
class AttributionSettings:
    """The settings of one attribution (defaults: Neuronpedia's)."""

    max_feature_nodes: Optional[int] = option(
        5000, "visit at most N features, most influential first (Neuronpedia's default; "
        "circuit-tracer's CLI: 7500); 'all': every active feature; 0: none (logits and "
        "tokens only). Time and the rows held grow linearly with N", metavar="N|all",
        type=feature_count)
    batch_size: int = option(64, "targets per backward pass", metavar="B")
    max_n_logits: int = option(10, "at most K logit targets", metavar="K")
    desired_logit_prob: float = option(0.95, "logit targets up to this cumulative probability, in "
                                       "(0, 1]", metavar="P")

    def check(self) -> "AttributionSettings":
        """Raise a UsageError naming the option of a value out of range."""
        def bad(name: str, rule: str) -> UsageError:
            return UsageError(f"{flag_of(type(self), name)} ({name}) must be {rule}, got "
                              f"{getattr(self, name)}")

        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise bad("max_feature_nodes", ">= 0 or 'all'")
        if self.batch_size < 1:
            raise bad("batch_size", ">= 1")
        if self.max_n_logits < 1:
            raise bad("max_n_logits", ">= 1")
        if not 0 < self.desired_logit_prob <= 1:
            raise bad("desired_logit_prob", "in (0, 1]")
        return self
