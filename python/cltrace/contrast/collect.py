"""Per prompt and feature, the values a contrast tests, read from a traced batch.

For each prompt traced ``ok`` and each transcoder feature (layer, index):

* ``influence``: its influence on the prompt's targets summed over its positions, from the
  manifest record's ``features`` (the pruned graph's kept features); 0 when pruning dropped it.
* ``activation``: the largest of its activations over the positions where the pruned graph
  keeps it (the graph JSON's feature nodes); 0 when the pruned graph does not keep it. A
  feature pruned away from a prompt counts as 0 although it may be active there: the values
  are those of the pruned graphs (cheap, and what the viewer shows), not a re-encoding.
* ``kept``: whether the pruned graph keeps it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FEATURE = "cross layer transcoder"


def feature_key(node: dict) -> tuple[int, int]:
    """(layer, feature index) of a feature node (its ``jsNodeId`` is ``{layer}_{index}-0``)."""
    layer, feat = node["jsNodeId"].removesuffix("-0").split("_")
    return int(layer), int(feat)


@dataclass
class FeatureTable:
    """Values of F features over n prompts (rows in ``slugs`` order)."""

    slugs: list  # [n]
    sets: np.ndarray  # [n] int: 0 for set A, 1 for set B
    keys: list  # [F] (layer, index)
    activation: np.ndarray  # [n, F]
    influence: np.ndarray  # [n, F]
    kept: np.ndarray  # [n, F] bool
    labels: dict = field(default_factory=dict)  # (layer, index) -> the node's clerp


def collect(prompts: list, records: dict, graphs) -> FeatureTable:
    """``prompts``: [(slug, set 0/1)] of the prompts traced ok; ``records``: slug -> its
    manifest record; ``graphs(slug)``: the prompt's graph JSON as a dict (or None)."""
    acts: list[dict] = []
    infls: list[dict] = []
    labels: dict = {}
    for slug, _ in prompts:
        infl = {(int(l), int(f)): float(v) for l, f, v in records[slug].get("features", [])}
        act: dict = {}
        g = graphs(slug)
        for node in (g or {}).get("nodes", []):
            if node.get("feature_type") != FEATURE:
                continue
            key = feature_key(node)
            act[key] = max(act.get(key, -np.inf), float(node.get("activation") or 0.0))
            if node.get("clerp"):
                labels.setdefault(key, node["clerp"])
        acts.append(act)
        infls.append(infl)
    keys = sorted(set().union(*acts, *infls)) if prompts else []
    col = {k: j for j, k in enumerate(keys)}
    n = len(prompts)
    activation, influence = np.zeros((n, len(keys))), np.zeros((n, len(keys)))
    kept = np.zeros((n, len(keys)), dtype=bool)
    for i, (act, infl) in enumerate(zip(acts, infls)):
        for k, v in act.items():
            activation[i, col[k]] = v
        for k, v in infl.items():
            influence[i, col[k]] = v
            kept[i, col[k]] = True
        for k in act:
            kept[i, col[k]] = True
    return FeatureTable([s for s, _ in prompts], np.array([s for _, s in prompts], dtype=int),
                        keys, activation, influence, kept, labels)
