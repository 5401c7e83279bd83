"""The attribution graph: nodes, the direct-effect edges between them, storage and conversions.

Node order (as in circuit-tracer, so graphs can be compared index for index)::

    [features (n_features), errors (n_layers * n_pos, layer-major), tokens (n_pos), logits]

Only features and logits have incoming edges. Edges are therefore stored as the rows of the
targets only: ``edges [n_targets, N]`` with ``edge_targets [n_targets]`` naming the node of
each row, so memory grows as targets x nodes, never nodes². ``edges[r, s]`` is the direct
effect of source node ``s`` on target ``edge_targets[r]`` (gradient x activation through the
frozen linear paths; Ameisen et al. 2025, https://transformer-circuits.pub/2025/attribution-graphs/methods.html).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import atomic_path
from ..errors import UsageError

FORMAT_VERSION = 1


class NodeKind(IntEnum):
    FEATURE = 0
    ERROR = 1
    TOKEN = 2
    LOGIT = 3


@dataclass
class NodeTable:
    """One row per node, in node order."""

    kind: Tensor  # [N] int8 (NodeKind)
    layer: Tensor  # [N] int64: feature/error layer; -1 token; n_layers logit
    pos: Tensor  # [N] int64 token position (logits: the last position)
    feature: Tensor  # [N] int64 feature index (-1 if not a feature)
    token_id: Tensor  # [N] int64 token id of token and logit nodes (-1 otherwise; logits of custom directions: vocab_size + i)
    activation: Tensor  # [N] float32: feature activation; logit probability; 0 otherwise


@dataclass
class Graph:
    """An unpruned attribution graph for one prompt."""

    prompt: str
    tokens: Tensor  # [n_pos] int64
    token_strs: list[str]  # decoded text of each prompt token
    n_layers: int
    features: Tensor  # [n_features, 3] int64: (layer, pos, feature) of each feature node
    activations: Tensor  # [n_features] float32
    logit_tokens: Tensor  # [n_logits] int64 (custom directions: vocab_size + i)
    logit_labels: list[str]  # text of each logit target
    logit_probs: Tensor  # [n_logits] float32 (weights of the logit targets in pruning)
    edges: Tensor  # [n_targets, N] float32
    edge_targets: Tensor  # [n_targets] int64, ascending node indices (features, then logits)
    model_name: str = ""
    scan: str = ""  # transcoder set identifier for Neuronpedia
    transcoder_list: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # attribution settings used
    info: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. synthetic transcoders)

    # --- sizes and node ranges -----------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return int(self.tokens.numel())

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.numel())

    @property
    def n_nodes(self) -> int:
        return self.n_features + (self.n_layers + 1) * self.n_pos + self.n_logits

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def error_node(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def logit_weights(self) -> Tensor:
        """[N] float64: logit probabilities on logit nodes, 0 elsewhere (the pruning seed)."""
        w = torch.zeros(self.n_nodes, dtype=torch.float64)
        w[self.logit_start:] = self.logit_probs.double()
        return w

    def nodes(self) -> NodeTable:
        """The node table (kind, layer, position, feature, token id, activation of each node)."""
        n_pos, L, nf, nl = self.n_pos, self.n_layers, self.n_features, self.n_logits
        i64 = dict(dtype=torch.int64)
        err_layer = torch.arange(L, **i64).repeat_interleave(n_pos)
        err_pos = torch.arange(n_pos, **i64).repeat(L)
        pos_all = torch.arange(n_pos, **i64)
        kind = torch.cat([torch.full((nf,), NodeKind.FEATURE), torch.full((L * n_pos,), NodeKind.ERROR),
                          torch.full((n_pos,), NodeKind.TOKEN), torch.full((nl,), NodeKind.LOGIT)])
        return NodeTable(
            kind=kind.to(torch.int8),
            layer=torch.cat([self.features[:, 0], err_layer, torch.full((n_pos,), -1, **i64),
                             torch.full((nl,), L, **i64)]),
            pos=torch.cat([self.features[:, 1], err_pos, pos_all, torch.full((nl,), n_pos - 1, **i64)]),
            feature=torch.cat([self.features[:, 2], torch.full((L * n_pos + n_pos + nl,), -1, **i64)]),
            token_id=torch.cat([torch.full((nf + L * n_pos,), -1, **i64), self.tokens.long(),
                                self.logit_tokens.long()]),
            activation=torch.cat([self.activations.float(), torch.zeros(L * n_pos + n_pos),
                                  self.logit_probs.float()]),
        )

    def node_ids(self) -> list[str]:
        """Neuronpedia node ids: feature ``{layer}_{feat}_{pos}``, error ``{layer}_-1_{pos}``,
        token ``E_{token}_{pos}``, logit ``{n_layers+1}_{token}_{pos}``."""
        ids = [f"{l}_{f}_{p}" for l, p, f in self.features.tolist()]
        ids += [f"{l}_-1_{p}" for l in range(self.n_layers) for p in range(self.n_pos)]
        ids += [f"E_{t}_{p}" for p, t in enumerate(self.tokens.tolist())]
        ids += [f"{self.n_layers + 1}_{t}_{self.n_pos - 1}" for t in self.logit_tokens.tolist()]
        return ids

    # --- conversions ---------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """[N, N] adjacency, rows targets, columns sources (small graphs only)."""
        dense = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.edges.dtype)
        dense[self.edge_targets] = self.edges
        return dense

    def to_networkx(self, prune_result=None):
        """``networkx.DiGraph`` (edges source -> target, attribute ``weight``); nodes carry the
        node table's fields. With a :class:`~cltrace.graph.PruneResult`, only what it kept."""
        import networkx as nx

        table, ids = self.nodes(), self.node_ids()
        keep = prune_result.node_mask if prune_result is not None else torch.ones(self.n_nodes, dtype=torch.bool)
        g = nx.DiGraph(prompt=self.prompt, model=self.model_name, scan=self.scan)
        for i in keep.nonzero().flatten().tolist():
            g.add_node(ids[i], kind=NodeKind(int(table.kind[i])).name.lower(), layer=int(table.layer[i]),
                       pos=int(table.pos[i]), feature=int(table.feature[i]),
                       token_id=int(table.token_id[i]), activation=float(table.activation[i]))
        mask = prune_result.edge_mask if prune_result is not None else self.edges != 0
        rows, cols = mask.nonzero(as_tuple=True)
        for r, c, w in zip(self.edge_targets[rows].tolist(), cols.tolist(), self.edges[rows, cols].tolist()):
            if ids[c] in g and ids[r] in g:
                g.add_edge(ids[c], ids[r], weight=w)
        return g

    # --- storage -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors: every tensor) and ``path`` + ``.json`` (the rest), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {k: v.contiguous() for k, v in self._tensors().items()}
        meta = {k: v for k, v in asdict(self).items() if k not in self._tensors()}
        meta["format_version"] = FORMAT_VERSION
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        with atomic_path(Path(str(path) + ".json")) as tmp:
            # ASCII with escapes: any token text round-trips, a lone surrogate included
            Path(tmp).write_text(json.dumps(meta, indent=1), encoding="ascii")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Graph":
        """Read a graph written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        side = Path(str(path) + ".json")
        for p in (path, side):
            if not p.exists():
                raise FileNotFoundError(f"graph file {p} is missing (Graph.save writes {path} and {side})")
        meta = json.loads(side.read_text(encoding="utf-8"))
        if meta.pop("format_version", None) != FORMAT_VERSION:
            raise UsageError(f"{side}: not a cltrace graph of format version {FORMAT_VERSION}")
        return cls(**meta, **load_file(path))

    def _tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("tokens", "features", "activations", "logit_tokens",
                                               "logit_probs", "edges", "edge_targets")}


