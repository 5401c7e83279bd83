"""The graph JSON read by Neuronpedia and circuit-tracer's local viewer, and graph-metadata.json.

Only what pruning kept is written: the kept nodes that have a kept edge (tokens and logits
always), and the kept edges, ordered by (target, source) node index, and the token x layer
``relevance`` map; with an attention report, its fields (:mod:`.attention`). Output is a pure
function of the graph and the settings, so identical inputs give byte-identical files.
Schema: ``graph_schema.json`` beside this file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from .. import __version__
from ..graph.graph import Graph, NodeKind
from ..atomic import atomic_write_text
from ..errors import UsageError
from ..graph.pruning import PruneResult, prune
from ..graph.relevance import relevance
from .attention import link_heads, qk_fields
from ..settings import as_dict

SCHEMA_VERSION = 1
GRAPH_SCHEMA_PATH = Path(__file__).with_name("graph_schema.json")
FEATURE_TYPE = {NodeKind.FEATURE: "cross layer transcoder", NodeKind.ERROR: "mlp reconstruction error",
                NodeKind.TOKEN: "embedding", NodeKind.LOGIT: "logit"}


def cantor_pair(layer: int, feature: int) -> int:
    """The ``feature`` field of a feature node under ``schema_version`` 1: the Cantor pairing
    ``(l + f)(l + f + 1)/2 + f`` of (layer, feature index), which viewers unpair to fetch the
    feature's page."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    """(layer, feature index) of a Cantor-paired ``feature`` field."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature


def check_slug(slug: str, flag: str = "--slug") -> str:
    """``slug`` if it can name a file (non-empty, no '/', '\\' or NUL), else a UsageError
    naming ``flag``."""
    if not slug or any(c in slug for c in '/\\\0'):
        raise UsageError(f"{flag} {slug!r} must be a non-empty file name (no '/')")
    return slug


def _node_maker(graph: Graph, result: PruneResult, labels: Mapping[tuple[int, int], str]):
    """A function from a node index to its JSON object (the node table read once)."""
    table, ids = graph.nodes(), graph.node_ids()
    kinds, layers, poss = table.kind.tolist(), table.layer.tolist(), table.pos.tolist()
    feats, toks, acts = table.feature.tolist(), table.token_id.tolist(), table.activation.tolist()
    cumulative = result.cumulative_scores.tolist()

    def make(i: int) -> dict[str, Any]:
        kind, layer, pos = NodeKind(kinds[i]), layers[i], poss[i]
        node = {"node_id": ids[i], "feature": feats[i], "layer": str(layer), "ctx_idx": pos,
                "feature_type": FEATURE_TYPE[kind], "jsNodeId": "", "clerp": "", "token_prob": 0.0,
                "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                "influence": cumulative[i], "activation": None}
        if kind == NodeKind.FEATURE:
            node.update(feature=cantor_pair(layer, feats[i]), jsNodeId=f"{layer}_{feats[i]}-0",
                        activation=acts[i], clerp=labels.get((layer, feats[i]), ""))
        elif kind == NodeKind.ERROR:
            node["jsNodeId"] = f"{layer}_-1_{pos}-0"
        elif kind == NodeKind.TOKEN:
            node.update(feature=pos, layer="E", jsNodeId=f"E_{toks[i]}-{pos}",
                        clerp=f'Emb: "{graph.token_strs[pos]}"')
        else:
            j = i - graph.logit_start
            prob = float(graph.logit_probs[j])
            node.update(feature=toks[i], layer=str(graph.n_layers + 1), jsNodeId=f"L_{toks[i]}-{pos}",
                        token_prob=prob, is_target_logit=j == 0, influence=None,
                        clerp=f'Output "{graph.logit_labels[j]}" (p={prob:.3f})')
        return node

    return make


def _unvisited_feature(c, labels: Mapping[tuple[int, int], str]) -> dict[str, Any]:
    """The JSON object of an active feature the graph did not visit (a QK contributor)."""
    return {"node_id": f"{c.layer}_{c.feature}_{c.pos}", "feature": cantor_pair(c.layer, c.feature),
            "layer": str(c.layer), "ctx_idx": c.pos, "feature_type": FEATURE_TYPE[NodeKind.FEATURE],
            "jsNodeId": f"{c.layer}_{c.feature}-0", "clerp": labels.get((c.layer, c.feature), ""),
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "influence": None, "activation": c.activation}


def relevance_field(graph: Graph, result: PruneResult) -> dict[str, Any]:
    """The ``relevance`` object: the token x layer map of the nodes' influence."""
    values = relevance(graph, result.influence)
    return {"rows": ["E"] + [str(L) for L in range(graph.n_layers)],
            "values": [[float(f"{x:.6g}") for x in row] for row in values.tolist()]}


def _links(graph: Graph, result: PruneResult, ids: list[str]) -> list[dict[str, Any]]:
    rows, cols = result.edge_mask.nonzero(as_tuple=True)  # row-major: by target, then source
    weights = graph.edges[rows, cols].tolist()
    targets = graph.edge_targets[rows].tolist()
    return [{"source": ids[s], "target": ids[t], "weight": w}
            for t, s, w in zip(targets, cols.tolist(), weights)]


def to_neuronpedia(graph: Graph, slug: str, result: Optional[PruneResult] = None, *,
                   labels: Optional[Mapping[tuple[int, int], str]] = None, scan: Optional[str] = None,
                   feature_details: Optional[dict[str, Any]] = None, attention=None) -> dict[str, Any]:
    """The viewer JSON of ``graph`` as pruned by ``result`` (default: :func:`prune` at its
    default thresholds), as a dict; ``pruning_settings`` records ``result``'s thresholds.

    ``labels`` fill the ``clerp`` of feature nodes by (layer, feature index); ``scan``
    overrides the graph's (``"./features"``: the viewers fetch feature pages from that folder
    beside the JSON); ``feature_details`` is written into the metadata as given.
    ``attention`` (an attention report of the same pruning,
    :func:`cltrace.attention.explain_attention`) adds the head splits of the links and the QK
    traces (docs/interop.md, "Attention")."""
    check_slug(slug, "slug")
    result = result if result is not None else prune(graph)
    ids = graph.node_ids()
    labels = labels or {}
    links = _links(graph, result, ids)
    connected = {l["source"] for l in links} | {l["target"] for l in links}
    make = _node_maker(graph, result, labels)
    nodes = [n for n in (make(i) for i in result.node_mask.nonzero().flatten().tolist())
             if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan or graph.scan or graph.model_name or "unknown",
        "transcoder_list": list(graph.transcoder_list),
        "prompt_tokens": list(graph.token_strs),
        "prompt": graph.prompt,
        "node_threshold": result.settings.node_threshold,
        "schema_version": SCHEMA_VERSION,
        "info": {"generator": {"name": "cltrace", "version": __version__},
                 **({"model": graph.model_name} if graph.model_name else {}),
                 **graph.info},
        "generation_settings": dict(graph.settings),
        "pruning_settings": as_dict(result.settings),
    }
    if feature_details:
        metadata["feature_details"] = dict(feature_details)
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    data = {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links,
            "relevance": relevance_field(graph, result)}
    if attention is not None:
        metadata["attention_settings"] = as_dict(attention.settings)
        heads = link_heads(attention, ids, attention.settings.link_heads)
        for link in links:
            split = heads.get((link["target"], link["source"]))
            if split is not None:
                link["heads"] = split
        qk = qk_fields(attention, ids, {n["node_id"] for n in nodes}, make,
                       lambda c: _unvisited_feature(c, labels))
        for node in nodes:
            if node["node_id"] in qk["by_node"]:
                node["qk_tracing_results"] = qk["by_node"][node["node_id"]]
        data.update(qk_traces=qk["qk_traces"], qk_only_nodes=qk["qk_only_nodes"],
                    head_patterns=qk["head_patterns"])
    return data


def write_neuronpedia(graph: Graph, out_dir: str | Path, slug: str,
                      result: Optional[PruneResult] = None, **kw) -> Path:
    """Write ``out_dir/{slug}.json`` and add/replace its entry in ``out_dir/graph-metadata.json``
    (``result`` and ``kw``: as :func:`to_neuronpedia`)."""
    data = to_neuronpedia(graph, slug, result, **kw)
    out_dir = Path(out_dir)
    path = out_dir / f"{slug}.json"
    # compact: with ``indent`` the json module falls back to its pure-Python encoder, 3x slower
    # (0.5 s for a graph of 100k links); the index below is small and stays indented
    atomic_write_text(path, json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n")
    index_path = out_dir / "graph-metadata.json"
    index = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{index_path} is not valid JSON ({e}); move it away to start a new index") from e
    graphs = [g for g in index.get("graphs", []) if g.get("slug") != slug]
    graphs.append(data["metadata"])
    graphs.sort(key=lambda g: g.get("slug", ""))
    atomic_write_text(index_path, json.dumps({"graphs": graphs}, indent=1, allow_nan=False) + "\n")
    return path
