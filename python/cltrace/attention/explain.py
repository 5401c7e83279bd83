"""Attention for a pruned graph: the head split of its links and the QK traces of its top heads.

:func:`explain_attention` reruns the prompt's forward pass (the replacement state is not kept
by :func:`cltrace.attribution.attribute`), splits the kept edges by head (:mod:`.loadings`),
picks the heads that carry the largest share of the top edges into the most influential
nodes, and splits those heads' scores (:mod:`.qk`). Sources are named by graph node where
they are nodes; a contributor the graph does not hold (a feature it did not visit, the
constants) is described in :attr:`AttentionReport.contributors`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..attribution.rows import EdgeRows
from ..attribution.targets import default_targets
from ..errors import UsageError
from ..frozen.model import Seeds
from ..graph.graph import Graph, NodeKind
from .loadings import HeadLoadings, Sources, head_loadings
from .maps import QKMaps
from .qk import CONST, QKDecomposition, QKTrace, decompose, side_keys
from .settings import QKSettings

FULL_PATTERNS = 128  # prompts up to this many positions get whole head patterns in the report
MAX_PATTERN_HEADS = 32  # patterns kept: the traced heads, then the heads carrying most of the links


@dataclass
class Contributor:
    """A QK source: a graph node (``node >= 0``) or one the graph does not hold."""

    kind: str  # "feature", "error", "token", "const"
    layer: int  # the feature's or error's layer; -1 a token; the traced layer for "const"
    pos: int
    feature: int = -1
    activation: float = 0.0
    token_id: int = -1
    node: int = -1  # the graph node index, -1 if not a node


@dataclass
class AttentionReport:
    """What ``--qk`` adds to a pruned graph (JSON: docs/interop.md, "Attention")."""

    edges: Tensor  # [E, 2] int64  (target node, source node) of each split edge
    loadings: HeadLoadings  # the split of those edges
    traces: list[QKTrace]  # in the order traced
    trace_edges: list  # per trace: (target node, source node) of the edge it explains, or None
    contributors: dict[tuple, Contributor]  # (layer, col) -> source; col CONST: the constants
    # (layer, head) -> (query positions [m], their pattern rows [m, n_pos]): every row up to
    # FULL_PATTERNS positions, else the rows of the traced queries and the last position
    patterns: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    settings: QKSettings = QKSettings()


def _columns(graph: Graph, state, af, rows: EdgeRows) -> Tensor:
    """``[N]`` each graph node's column in ``rows`` (-1 for logits); ``af``: the state's
    active features (the feature columns, in order)."""
    n_pos = state.n_pos
    key = (af.layer * n_pos + af.pos) * (1 << 32) + af.feature  # sorted: (layer, pos, feature)
    g = graph.features
    gkey = (g[:, 0] * n_pos + g[:, 1]) * (1 << 32) + g[:, 2]
    col = torch.searchsorted(key.cpu(), gkey)
    if len(gkey) and (len(key) == 0 or not bool((key.cpu()[col.clamp(max=len(key) - 1)] == gkey).all())):
        raise UsageError("the graph's features are not active on its prompt with this model and "
                         "dictionary set: trace it again with the same ones")
    out = torch.full((graph.n_nodes,), -1, dtype=torch.int64)
    out[:graph.n_features] = col
    E = graph.n_layers * n_pos
    out[graph.error_start:graph.error_start + E] = rows.error_start + torch.arange(E)
    out[graph.token_start:graph.token_start + n_pos] = rows.token_start + torch.arange(n_pos)
    return out


def _target_seeds(graph: Graph, state, nodes: Tensor, logit_vecs: Tensor) -> Seeds:
    """Seeds of the target nodes ``nodes`` (features: encoder columns; logits: directions)."""
    table = graph.nodes()
    fz = state.frozen
    dev = state.tokens.device
    layer, pos = table.layer[nodes].clone(), table.pos[nodes].clone()
    vec = torch.empty(len(nodes), fz.d_model, dtype=fz.dtype, device=dev)
    is_feat = table.kind[nodes] == NodeKind.FEATURE
    if bool(is_feat.any()):
        f = nodes[is_feat]
        vec[is_feat] = state.feature_seeds(table.layer[f], table.pos[f], table.feature[f]).vec.to(fz.dtype)
    if bool((~is_feat).any()):
        vec[~is_feat] = logit_vecs[nodes[~is_feat] - graph.logit_start].to(fz.dtype)
        layer[~is_feat] = graph.n_layers
    return Seeds(layer.to(dev), pos.to(dev), vec)


def _sources(graph: Graph, state, af, nodes: Tensor, cols: Tensor) -> Sources:
    """What the source nodes ``nodes`` (features, errors, tokens; ``cols``: their columns,
    ``af``: the active features) write, layer by layer (activations in the model's dtype)."""
    table = graph.nodes()
    fz, tcs = state.frozen, state.transcoders
    S, n, d = len(nodes), fz.n_layers, fz.d_model
    dev = state.tokens.device
    embed = torch.zeros(S, d, dtype=fz.dtype, device=dev)
    writes = torch.zeros(S, n, d, dtype=fz.dtype, device=dev)
    kind, layer, pos, feat = (x[nodes] for x in (table.kind, table.layer, table.pos, table.feature))
    tok = (kind == NodeKind.TOKEN).nonzero().flatten()
    embed[tok] = state.embed[pos[tok]].to(fz.dtype)
    err = (kind == NodeKind.ERROR).nonzero().flatten()
    writes[err, layer[err]] = state.errors[layer[err], pos[err]].to(fz.dtype)
    is_feat = kind == NodeKind.FEATURE
    for S in layer[is_feat].unique().tolist():  # per source layer: its decoder rows, gathered
        sel = (is_feat & (layer == S)).nonzero().flatten()
        a = af.value[cols[sel]].to(fz.dtype)[:, None]  # [k, 1]
        for L in range(S, n):
            if S in tcs.sources_writing_to(L):
                writes[sel, L] = a * tcs.decoder_slice(S, L)[feat[sel]].to(device=dev, dtype=fz.dtype)
    return Sources(pos.to(dev), embed, writes)


def _logit_vectors(graph: Graph, state, model, targets) -> Tensor:
    """The graph's logit directions, recomputed (custom directions need their ``targets``)."""
    vocab = state.logits.shape[-1]
    if targets is None and bool((graph.logit_tokens >= vocab).any()):
        raise UsageError("the graph has custom logit directions: pass the targets it was traced with")
    found = default_targets(state.logits[-1], max_n_logits=graph.n_logits, desired_logit_prob=1.0,
                            direction=state.frozen.logit_direction, decode=str, targets=targets,
                            tokenizer=model.tokenizer) if targets else None
    if found is not None:
        if [t.token_id for t in found] != graph.logit_tokens.tolist():
            raise UsageError("the targets given are not the graph's logit targets")
        return torch.stack([t.vec for t in found])
    return state.frozen.logit_direction(graph.logit_tokens.to(state.tokens.device))


def _chosen_traces(graph: Graph, result, report_edges: Tensor, loads: HeadLoadings,
                   settings: QKSettings) -> list[tuple]:
    """(layer, head, query, key, (target, source)) of the heads carrying the most of the top
    edges into the top nodes: the most probable logit, then the kept features by influence;
    per node its ``qk_edges`` edges with the largest one-hop share, per edge its largest head."""
    table = graph.nodes()
    feats = torch.arange(graph.n_features)[result.node_mask[:graph.n_features]]
    feats = feats[result.influence[feats].argsort(descending=True, stable=True)]
    top_logit = graph.logit_start + graph.logit_probs.argmax().reshape(1)
    out, seen = [], set()
    for t in torch.cat([top_logit, feats])[:settings.qk_nodes].tolist():
        rows = (report_edges[:, 0] == t).nonzero().flatten()
        if rows.numel() == 0:
            continue
        share = loads.one_hop[rows].sum((1, 2)).abs()
        for r in rows[share.argsort(descending=True, stable=True)][:settings.qk_edges].tolist():
            if float(loads.one_hop[r].abs().max()) == 0.0:
                continue
            flat = int(loads.one_hop[r].abs().flatten().argmax())
            layer, head = divmod(flat, loads.one_hop.shape[2])
            s = int(report_edges[r, 1])
            key = (layer, head, int(table.pos[t]), int(table.pos[s]))
            if key not in seen:
                seen.add(key)
                out.append((*key, (t, s)))
    return out


def _rerun(model, graph: Graph, prompt):
    """The replacement state of the graph's prompt: ``prompt`` (an image prompt: its soft
    tokens are in no token id) or else the graph's tokens."""
    if prompt is None:
        images = getattr(model, "images", None)
        if images is not None and bool((graph.tokens == images.vision.tokens.soft).any()):
            raise UsageError("the graph's prompt has images: pass the image prompt it was traced "
                             "on (explain_attention(..., prompt=model.images.prompt(text, images)))")
        prompt = graph.tokens
    return model.run(prompt, all_logits=False)


def explain_attention(model, graph: Graph, result, settings: QKSettings = QKSettings(), *,
                      targets: Optional[Sequence] = None, edges: Optional[Tensor] = None,
                      timings: Optional[dict] = None, prompt=None) -> AttentionReport:
    """Head loadings of ``edges`` (``[E, 2]`` (target, source) node indices; default: the
    edges ``result`` kept) and QK traces of the heads that carry the top ones (and of
    ``settings.qk_trace``), for ``graph`` traced with ``model`` (a ReplacementModel).
    ``targets``: the targets the graph was traced with, if they were custom directions.
    ``prompt``: the graph's prompt when its tokens do not say it all, an image prompt
    (:class:`cltrace.models.multimodal.ImagePrompt`: soft tokens at their positions, both-way
    attention among one image's soft tokens); soft tokens are sources like token embeddings,
    and a traced key may follow its query inside one image.
    ``timings`` (a dict), if given, receives the seconds of the forward, the head loadings and
    the QK traces."""
    settings.check()
    times = timings if timings is not None else {}
    t0 = time.perf_counter()
    state = _rerun(model, graph, prompt)
    if not torch.equal(state.tokens.cpu(), graph.tokens.cpu()):
        raise UsageError("the graph's tokens differ from the model's tokenization")
    maps = QKMaps(state, model.parts)
    for trace in settings.qk_trace:  # a bad request fails before the work
        maps.check(*trace)
    rows = EdgeRows(state, carry_prefix=True)
    af = state.active_features()
    cols = _columns(graph, state, af, rows)
    times["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if edges is None:
        r, c = result.edge_mask.nonzero(as_tuple=True)
        edges = torch.stack([graph.edge_targets[r], c], 1)
    edges = edges.long().reshape(-1, 2)
    t_nodes, t_idx = edges[:, 0].unique(return_inverse=True)
    s_nodes, s_idx = edges[:, 1].unique(return_inverse=True)
    logit_vecs = _logit_vectors(graph, state, model, targets)
    row_of = torch.full((graph.n_nodes,), -1, dtype=torch.int64)
    row_of[graph.edge_targets] = torch.arange(len(graph.edge_targets))
    if bool((row_of[edges[:, 0]] < 0).any()):
        raise UsageError("an edge's target is not a target of the graph (a visited feature or a logit)")
    known = graph.edges[row_of[edges[:, 0]], edges[:, 1]]  # as attributed (float32)
    loadings = head_loadings(rows, _target_seeds(graph, state, t_nodes, logit_vecs),
                             _sources(graph, state, af, s_nodes, cols[s_nodes]), t_idx, s_idx,
                             cols[s_nodes], edge=known)
    loadings = HeadLoadings(*(x.float().cpu() for x in loadings))
    times["loadings"] = time.perf_counter() - t0
    t0 = time.perf_counter()

    chosen = _chosen_traces(graph, result, edges, loadings, settings) if result is not None else []
    chosen += [(*t, None) for t in settings.qk_trace if t not in {c[:4] for c in chosen}]
    node_of_col = {int(c): i for i, c in enumerate(cols.tolist()) if c >= 0}
    sides: dict = {}  # shared between traces; a side is dropped once no later trace needs it
    traces, trace_edges, contributors = [], [], {}
    for i, (layer, head, q, k, edge) in enumerate(chosen):
        later = {key for c in chosen[i:] for key in side_keys(maps, *c[:4])}
        for key in [key for key in sides if key not in later]:
            del sides[key]
        dec = decompose(rows, maps, layer, head, q, k, sides=sides)
        tr = dec.summary(settings.qk_pairs, settings.qk_marginals, maps.prob(layer, head, q, k))
        traces.append(tr)
        trace_edges.append(edge)
        used = [(i, q) for i, _, _ in tr.pairs] + [(j, k) for _, j, _ in tr.pairs]
        used += [(i, q) for i, _ in tr.q_marginals] + [(j, k) for j, _ in tr.k_marginals]
        for col, pos in used:
            contributors[(layer, col, pos) if col == CONST else (layer, col)] = _contributor(
                rows, state, af, layer, col, pos, node_of_col)
    heads = {(t.layer, t.head) for t in traces}
    totals = loadings.one_hop.abs().sum(0)  # [n_layers, n_heads]: each head's share of the links
    for flat in totals.flatten().argsort(descending=True)[:max(0, MAX_PATTERN_HEADS - len(heads))].tolist():
        if float(totals.flatten()[flat]) > 0:
            heads.add(divmod(flat, totals.shape[1]))
    n = state.n_pos  # whole patterns up to FULL_PATTERNS positions, else the traced queries' rows
    queries = torch.arange(n) if n <= FULL_PATTERNS else torch.tensor(
        sorted({t.query_pos for t in traces} | {n - 1}))
    patterns = {(L, h): (queries, maps.pattern(L, h, queries).float().cpu()) for L, h in sorted(heads)}
    times["qk"] = time.perf_counter() - t0
    return AttentionReport(edges, loadings, traces, trace_edges, contributors, patterns, settings)


def _contributor(rows: EdgeRows, state, af, layer: int, col: int, pos: int, node_of_col: dict) -> Contributor:
    """Describe column ``col`` of ``rows`` (``CONST``: the constants of ``layer`` at ``pos``)."""
    if col == CONST:
        return Contributor("const", layer, pos)
    node = node_of_col.get(col, -1)
    if col >= rows.token_start:
        p = col - rows.token_start
        return Contributor("token", -1, p, token_id=int(state.tokens[p]), node=node)
    if col >= rows.error_start:
        L, p = divmod(col - rows.error_start, state.n_pos)
        return Contributor("error", L, p, node=node)
    return Contributor("feature", int(af.layer[col]), int(af.pos[col]), int(af.feature[col]),
                       float(af.value[col]), node=node)


def qk_attribution(model, prompt, layer: int, head: int, query: int, key: int) -> QKDecomposition:
    """The whole split of one head's score on ``prompt`` (text, token ids, or an image prompt
    of ``model.images.prompt``) at (``query``, ``key``): both sides' matrices over every source
    (:class:`.qk.QKDecomposition`; its ``summary`` gives the top pairs and marginals)."""
    state = model.run(prompt, all_logits=False)
    maps = QKMaps(state, model.parts)
    maps.check(layer, head, query, key)
    return decompose(EdgeRows(state, carry_prefix=True), maps, layer, head, query, key)
