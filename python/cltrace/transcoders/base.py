"""The in-memory form of a transcoder set, shared by every loader and the replacement model.

A *per-layer transcoder* (PLT) at layer L reads the MLP input of L (the output of
``pre_feedforward_layernorm``) and reconstructs the MLP output of L (the output of
``post_feedforward_layernorm``). A *cross-layer transcoder* (CLT) feature read at source
layer L writes to every layer L' >= L. Both are held the same way: a PLT is a CLT whose
features write to one layer (``W_dec.shape[1] == 1``).

The reconstruction of layer L's MLP output is
``sum_{S <= L} decode(acts_S, W_dec_S[:, L - S]) + b_dec_L (+ x_L @ W_skip_L)``.
Tensors may be memory-mapped CPU tensors: indexing a few decoder rows reads only those pages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

# Gemma Scope 2 hook points of a transcoder (the MLP input and output of layer L).
HOOK_IN = "model.layers.{L}.pre_feedforward_layernorm.output"
HOOK_OUT = "model.layers.{L}.post_feedforward_layernorm.output"


@dataclass
class LayerTranscoder:
    """The transcoder whose features read at one source layer."""

    W_enc: Tensor  # [d_model, d_sae]
    b_enc: Tensor  # [d_sae]
    threshold: Tensor  # [d_sae]  JumpReLU thresholds
    W_dec: Tensor  # [d_sae, n_out, d_model]: writes to layers layer .. layer + n_out - 1
    b_dec: Tensor  # [d_model]  added to the reconstruction of this layer's MLP output
    W_skip: Optional[Tensor] = None  # [d_model, d_model], applied as x @ W_skip

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_out(self) -> int:
        return self.W_dec.shape[1]

    def tensors(self) -> dict[str, Tensor]:
        """The weights by name (W_skip only when present)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "threshold": self.threshold,
               "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        return out

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LayerTranscoder":
        """A copy on ``device`` in ``dtype``; tensors already there are kept (not copied)."""
        moved = {k: t.to(device=device, dtype=dtype) for k, t in self.tensors().items()}
        return LayerTranscoder(**moved)


@dataclass
class TranscoderSet:
    """Transcoders for the layers of one model, keyed by source layer."""

    kind: Literal["plt", "clt"]
    n_layers: int  # layers of the model the set was trained on
    layers: dict[int, LayerTranscoder]
    model_name: str = ""  # e.g. "gemma-3-270m" (from config.json when known)
    source: str = ""  # where it was loaded from (path or hub reference)
    info: dict = field(default_factory=dict)  # width, l0, affine, dtype, bytes, ... for display

    @property
    def d_model(self) -> int:
        return next(iter(self.layers.values())).W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return next(iter(self.layers.values())).d_sae

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).W_enc.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of all weights (a view counts only the elements it shows)."""
        return sum(t.numel() * t.element_size()
                   for tc in self.layers.values() for t in tc.tensors().values())

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "TranscoderSet":
        """The set on ``device`` in ``dtype`` (copies only the tensors that change)."""
        layers = {i: tc.to(device=device, dtype=dtype) for i, tc in self.layers.items()}
        return TranscoderSet(self.kind, self.n_layers, layers, self.model_name, self.source,
                             dict(self.info))

    def decoder_slice(self, source: int, target: int) -> Tensor:
        """Decoder rows of source-layer features into target layer: [d_sae, d_model] (a view)."""
        tc = self.layers[source]
        if not 0 <= target - source < tc.n_out:
            raise ValueError(f"features of layer {source} do not write to layer {target}")
        return tc.W_dec[:, target - source, :]

    def sources_writing_to(self, target: int) -> list[int]:
        """Source layers whose features write to ``target`` (just [target] for a PLT)."""
        return [s for s, tc in sorted(self.layers.items()) if 0 <= target - s < tc.n_out]
