"""Ablate the features that separate two sets of prompts, on both sets: the causal check of a
``cltrace contrast`` report. From the report's ranked features (``contrast.json``) the top K
that are significant (q <= alpha; or the top K whatever their q, ``all_ranked``) each get one
intervention, by default ``=0`` at every position (an ablation; the command parses the
operation as ``--feature`` does); the set test
(:mod:`.prompt_set`) runs on each set's prompts; ``ablation.json`` records the features, the
metric and each set's rows and summary. The report and the sets are read by the caller (this
module takes their JSON and PromptSpecs; it imports nothing of :mod:`cltrace.contrast`).

``ablation.json`` (its ``format``: :data:`FORMAT`)::

    {"format": FORMAT, "report": "contrast.json", "by": "activation",
     "features": [{"layer", "feature", "rank", "label", "q", "significant"}, ...],
     "op": "=0", "interventions": ["0:7=0", ...], "metric": "logit-diff:...", "mode": "free",
     "note": "only 1 of the top 3 ... significant" | null,
     "sets": [{"name", "summary": {PairedSummary}, "prompts": [{slug, before, after, change}]}, x2]}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError
from ..settings import option

FORMAT = "cltrace.ablation/1"
FILE = "ablation.json"


@dataclass(frozen=True)
class AblationSettings:
    """Which of a contrast report's features ``cltrace steer --contrast`` intervenes on, how."""

    top: int = option(3, "intervene on the K top-ranked significant features of --contrast",
                      metavar="K")
    op: str = option("=0", "with --contrast: the operation on each feature, [@POS]{=V|*S|+A} as in "
                     "--feature (=0: ablated at every position)", metavar="OP")
    all_ranked: bool = option(False, "with --contrast: the K top-ranked features whether "
                              "significant or not (default: significant ones only)")

    def check(self) -> "AblationSettings":
        if self.top < 1:
            raise UsageError(f"--top must be >= 1, got {self.top}")
        return self


def select_features(report: dict, settings: AblationSettings) -> tuple[list[dict], Optional[str]]:
    """(the features to intervene on: {layer, feature, rank, label, q, significant}; a note
    when fewer than K qualify) from a contrast report's ranked ``features``. None qualifying
    is a UsageError."""
    by = report.get("settings", {}).get("by", "activation")
    ranked = report.get("features", [])
    pool = [(i, r) for i, r in enumerate(ranked, 1) if settings.all_ranked or r.get("significant")]
    chosen = [{"layer": int(r["layer"]), "feature": int(r["feature"]), "rank": i,
               "label": r.get("label", ""), "q": r.get(by, {}).get("q"),
               "significant": bool(r.get("significant"))} for i, r in pool[:settings.top]]
    if not chosen:
        why = "has no features" if not ranked else (
            f"has no significant feature (q <= {report.get('settings', {}).get('alpha')}); "
            "--all-ranked takes the top-ranked ones anyway")
        raise UsageError(f"the contrast report {why}")
    note = None
    if len(chosen) < settings.top:
        what = "features are significant" if not settings.all_ranked else "features are ranked"
        note = f"only {len(chosen)} of the top {settings.top} asked for: {len(pool)} {what}"
    return chosen, note


def ablation_json(names: list[str], results: list, features: list[dict], op: str,
                  note: Optional[str], by: str) -> bytes:
    """The bytes of ``ablation.json`` (module doc) from each set's
    :class:`~cltrace.steering.prompt_set.SetResult`."""
    first = results[0]
    data = {"format": FORMAT, "report": "contrast.json", "by": by, "features": features, "op": op,
            "interventions": first.interventions, "metric": first.metric.text, "mode": first.mode,
            "note": note,
            "sets": [{"name": n, "summary": r.summary.to_dict(), "prompts": [row.to_dict() for row in r.rows]}
                     for n, r in zip(names, results)]}
    return (json.dumps(data, indent=1, allow_nan=False) + "\n").encode()
