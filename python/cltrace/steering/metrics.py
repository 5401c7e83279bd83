"""Metrics of a prompt's behaviour, measured before and after an intervention.

* ``logit-diff:"A","B"`` — ``logit[A] − logit[B]`` at the prompt's last position; A and B must
  each be one token (``tokenizer(A, add_special_tokens=False)``), else an error naming it.
* ``logprob:"CONTINUATION"`` — ``Σ_t log p(c_t | prompt, c_<t)`` (natural log) of the
  continuation's tokens, teacher-forced: one forward pass over prompt + continuation.
* ``match:REGEX`` — 1 if ``re.search(REGEX, generated text)`` else 0 (Python ``re``); over a set
  its mean is the fraction of generations that match (e.g. a refusal phrase).

The quoted arguments are JSON strings (``logit-diff:" Paris"," London"`` keeps the spaces).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError

KINDS = ("logit-diff", "logprob", "match")


@dataclass(frozen=True)
class Metric:
    """A parsed ``--metric``: its kind and argument (token pair, continuation or regex)."""

    kind: str
    args: tuple  # ("A", "B") | ("continuation",) | ("regex",)
    text: str  # as given

    @property
    def generates(self) -> bool:
        return self.kind == "match"


def parse_metric(text: str) -> Metric:
    """``logit-diff:"A","B"``, ``logprob:"C"`` or ``match:REGEX`` -> :class:`Metric`
    (UsageError otherwise, naming the problem)."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise UsageError(f"--metric {text!r}: expected logit-diff:\"A\",\"B\", logprob:\"TEXT\" "
                         "or match:REGEX")
    if kind == "match":
        try:
            re.compile(rest)
        except re.error as e:
            raise UsageError(f"--metric {text!r}: bad regular expression ({e})") from None
        return Metric(kind, (rest,), text)
    try:
        args = json.loads(f"[{rest}]")
    except json.JSONDecodeError:
        args = None
    want = 2 if kind == "logit-diff" else 1
    if not (isinstance(args, list) and len(args) == want and all(isinstance(a, str) and a for a in args)):
        form = '"A","B" (two quoted tokens)' if want == 2 else '"TEXT" (one quoted string)'
        raise UsageError(f"--metric {text!r}: {kind} takes {form}")
    return Metric(kind, tuple(args), text)


def metric_ids(metric: Metric, tokenizer) -> Optional[tuple]:
    """The token ids the metric reads: (a, b) for logit-diff (each text one token, else an
    error naming it), the continuation's ids for logprob, None for match."""
    if metric.kind == "match":
        return None
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in metric.args]
    ids = [list(i.tolist()) if hasattr(i, "tolist") else list(i) for i in ids]
    if metric.kind == "logit-diff":
        for t, i in zip(metric.args, ids):
            if len(i) != 1:
                raise UsageError(f"--metric {metric.text!r}: {t!r} is {len(i)} tokens, not one")
        return ids[0][0], ids[1][0]
    if not ids[0]:
        raise UsageError(f"--metric {metric.text!r}: the continuation has no tokens")
    return tuple(ids[0])
