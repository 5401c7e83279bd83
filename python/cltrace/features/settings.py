"""What a feature-page build reads and keeps: the one source of these defaults, for
:func:`cltrace.features.build_pages` and ``cltrace features``' options."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..settings import flag_of, option


@dataclass(frozen=True)
class FeatureSettings:
    """The corpus scanned and what each feature's page keeps."""

    tokens: int = option(100_000, "tokens to scan, in whole rows", metavar="N")
    ctx: int = option(128, "tokens per row (BOS and T - 1 tokens)", metavar="T")
    top_k: int = option(20, "top activating examples per feature", metavar="K")
    n_samples: int = option(20, "sampled examples per feature, shown by activation quantile",
                            metavar="S", flag="--samples")
    window: int = option(16, "tokens each side of an example", metavar="W")
    batch_rows: int = option(16, "rows per forward pass", metavar="B")
    seed: int = option(0, "seed of the example sample")
    n_logits: int = 10  # top and bottom logits per page

    def check(self) -> "FeatureSettings":
        """Raise a UsageError naming the option of a value out of range."""
        for name in ("tokens", "top_k", "n_samples", "batch_rows"):
            if getattr(self, name) < 1:
                raise UsageError(f"{flag_of(type(self), name)} must be at least 1")
        if self.ctx < 2:
            raise UsageError("--ctx must be at least 2 (BOS and one token)")
        if self.window < 0:
            raise UsageError("--window must be >= 0")
        return self
