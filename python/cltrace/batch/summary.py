"""What recurs across a batch: the features kept in the pruned graphs of many prompts.

For each (layer, feature) kept by pruning in at least ``min_count`` prompts: the number of
prompts, the mean over those prompts of its influence on the logits (summed over its
positions; the manifest's ``features``), and a label: the ``clerp`` of its node in a graph
JSON when one was written there (labels come from feature pages). Written as
``features-summary.csv`` and ``features-summary.json`` beside the graphs.
"""
from __future__ import annotations

import csv
import io
import json
from typing import NamedTuple

from .store import Store
from ..errors import UsageError


class RecurringFeature(NamedTuple):
    layer: int
    feature: int
    count: int  # prompts whose pruned graph keeps it
    fraction: float  # count / prompts traced ok
    mean_influence: float  # over those prompts
    label: str  # the node's clerp, when a graph has one
    examples: list  # up to 5 slugs of prompts that keep it


def _done(store: Store) -> dict:
    """The last ok record of each slug."""
    return {r["slug"]: r for r in store.records() if r.get("status") == "ok"}


def _labels(store: Store, records: dict) -> dict:
    labels = {}
    for slug, r in records.items():
        if f"{slug}.json" not in r.get("files", []):
            continue
        raw = store.get(f"{slug}.json")
        for node in json.loads(raw)["nodes"] if raw else []:
            if node["feature_type"] == "cross layer transcoder" and node.get("clerp"):
                layer, feat = node["jsNodeId"].removesuffix("-0").split("_")
                labels.setdefault((int(layer), int(feat)), node["clerp"])
    return labels


def summarize(store: Store | str, min_count: int = 2, labels: bool = True) -> list[RecurringFeature]:
    """The recurring features of the batch in ``store``, most frequent first (then by mean
    influence)."""
    store = store if isinstance(store, Store) else Store(store)
    records = _done(store)
    if not records:
        raise UsageError(f"{store.location}: no traced prompts in its manifest.jsonl")
    acc: dict = {}
    for slug, r in records.items():
        for layer, feat, infl in r.get("features", []):
            entry = acc.setdefault((layer, feat), [0, 0.0, []])
            entry[0] += 1
            entry[1] += infl
            entry[2].append(slug)
    names = _labels(store, records) if labels else {}
    rows = [RecurringFeature(l, f, c, c / len(records), s / c, names.get((l, f), ""), sorted(ex)[:5])
            for (l, f), (c, s, ex) in acc.items() if c >= min_count]
    return sorted(rows, key=lambda r: (-r.count, -r.mean_influence, r.layer, r.feature))


def write_summary(store: Store, rows: list[RecurringFeature]) -> list[str]:
    """``features-summary.csv`` and ``.json`` in ``store``; returns where they went."""
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(RecurringFeature._fields)
    for r in rows:
        w.writerow([r.layer, r.feature, r.count, f"{r.fraction:.4f}", f"{r.mean_influence:.6g}",
                    r.label, " ".join(r.examples)])
    data = [r._asdict() for r in rows]
    return [store.put("features-summary.csv", text.getvalue().encode()),
            store.put("features-summary.json", (json.dumps(data, indent=1) + "\n").encode())]
