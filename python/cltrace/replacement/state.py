"""The replacement model on one prompt: what the real model did and its linearisation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..frozen.attention import as_dense
from ..frozen.capture import Capture
from ..frozen.model import FrozenLinearModel, FrozenOutput, Seeds
from ..ops import SparseActs, gather_columns
from ..transcoders.base import TranscoderSet
from .encoding import Reconstruction


class ActiveFeatures(NamedTuple):
    """All active features of a prompt as flat tensors, ordered by (layer, pos, feature)."""

    layer: Tensor  # [n_active] int64
    pos: Tensor  # [n_active] int64
    feature: Tensor  # [n_active] int64
    value: Tensor  # [n_active]  activation


@dataclass(repr=False)
class ReplacementState:
    """The replacement model on one prompt: what the real model did and its linearisation."""

    tokens: Tensor  # [n_pos] int64
    logits: Tensor  # [n_pos, vocab]  the real model's logits (or [1, vocab]: the last position)
    capture: Capture  # per-layer residuals, MLP in/out, patterns, norm scales
    acts: list[SparseActs]  # per layer: CSR over positions of the active features
    recon: Reconstruction  # [n_layers, n_pos, d_model] each: features, b_dec, skip
    errors: Tensor  # [n_layers, n_pos, d_model]  true MLP output - reconstruction
    skip_positions: int  # leading positions without features
    frozen: FrozenLinearModel  # the frozen linear model (forward and linearised backward)
    transcoders: TranscoderSet
    image_groups: Optional[Tensor] = None  # [n_pos] image index of each soft token, -1 text;
    #                                        None: a text prompt
    labels: Optional[list] = None  # one name per position (``<img r,c>`` for soft tokens), or
    #                                None: the decoded tokens

    @property
    def n_pos(self) -> int:
        return self.tokens.numel()

    def __repr__(self) -> str:
        n_active = sum(a.feat_idx.numel() for a in self.acts)
        err = (self.errors.norm() / self.mlp_out.to(self.errors.dtype).norm()).item()
        return (f"ReplacementState(n_pos={self.n_pos}, n_layers={self.n_layers}, "
                f"active_features={n_active}, skip_positions={self.skip_positions}, "
                f"relative_error_norm={err:.3g})")

    @property
    def n_layers(self) -> int:
        return len(self.acts)

    @property
    def embed(self) -> Tensor:
        return self.capture.embed  # [n_pos, d_model]  scaled token embeddings

    @property
    def mlp_in(self) -> Tensor:
        return torch.stack([c.mlp_in for c in self.capture.layers])  # [n_layers, n_pos, d_model]

    @property
    def mlp_out(self) -> Tensor:
        return torch.stack([c.mlp_out for c in self.capture.layers])  # [n_layers, n_pos, d_model]

    @property
    def patterns(self) -> list[Tensor]:
        return [as_dense(c.pattern) for c in self.capture.layers]  # n_layers x [n_heads, n_pos, n_pos]

    def active_features(self) -> ActiveFeatures:
        """Every active (layer, pos, feature, value)."""
        parts = [(torch.full_like(a.feat_idx, L), a.rows(), a.feat_idx, a.acts)
                 for L, a in enumerate(self.acts)]
        return ActiveFeatures(*(torch.cat(t) for t in zip(*parts)))

    def sources(self) -> Tensor:
        """What each layer's MLP output receives from constants of the linearisation:
        feature decodes + b_dec + error vectors. [n_layers, n_pos, d_model]"""
        return self.recon.features + self.recon.bias + self.errors.to(self.recon.features.dtype)

    def replacement_forward(self, include_errors: bool = True) -> FrozenOutput:
        """The frozen linear model on the prompt (with errors: reproduces ``logits``)."""
        src = self.sources() if include_errors else self.recon.features + self.recon.bias
        return self.frozen(self.embed, src)

    def feature_seeds(self, layer: Tensor, pos: Tensor, feature: Tensor) -> Seeds:
        """Backward seeds of feature pre-activations: encoder columns at their MLP input."""
        layer, pos, feature = (torch.as_tensor(t, device=self.tokens.device).reshape(-1).long()
                               for t in (layer, pos, feature))
        vec = torch.empty(layer.numel(), self.frozen.d_model, dtype=self.frozen.dtype,
                          device=self.tokens.device)
        for L in layer.unique().tolist():
            sel = (layer == L).nonzero().flatten()
            W_enc = self.transcoders.layers[L].W_enc  # [d_model, d_sae]
            vec[sel] = gather_columns(W_enc, feature[sel].to(W_enc.device)).to(vec)
        return Seeds(layer, pos % self.n_pos, vec)
