"""The in-memory form of a dictionary set, shared by every loader and the replacement model.

Every dictionary is described the same way: the *site* it reads (``site_in``), the site it
writes (``site_out``), see :mod:`cltrace.models.sites`, and its layers. A *per-layer
transcoder* (PLT) at layer L reads the MLP input of L (``mlp_in``, the output of
``pre_feedforward_layernorm``) and reconstructs the MLP output of L (``mlp_out``, the output of
``post_feedforward_layernorm``). A *cross-layer transcoder* (CLT) feature read at source
layer L writes to every layer L' >= L. An *SAE* reads and writes one site (``resid_post``,
``attn_out`` or ``mlp_out``) of its layer; a (weakly causal) *crosscoder* is an SAE on the
``resid_post`` of a few layers whose features, read at one of them, write to it and the later
ones. All are held the same way: a dictionary whose features write to one layer has
``W_dec.shape[1] == 1``; otherwise ``W_dec[:, k]`` writes to the k-th of the set's ``sites``
from the source's own (``sites`` is every layer of the model for a CLT).

The reconstruction of the output site at layer L is
``sum_{S <= L} decode(acts_S, W_dec_S[:, k(S, L)]) + b_dec_L (+ x_L @ W_skip_L)``.
Tensors may be memory-mapped CPU tensors: indexing a few decoder rows reads only those pages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import Tensor

from ..models.sites import SITES

# Gemma Scope 2 hook points of a transcoder (the MLP input and output of layer L).
HOOK_IN = SITES["mlp_in"]
HOOK_OUT = SITES["mlp_out"]


@dataclass
class LayerTranscoder:
    """The dictionary whose features read at one source layer (d_in = d_out = d_model for
    transcoders; an ``attn_out`` SAE's d_in = d_out = heads x head_dim)."""

    W_enc: Tensor  # [d_in, d_sae]
    b_enc: Tensor  # [d_sae]
    threshold: Tensor  # [d_sae]  JumpReLU thresholds
    W_dec: Tensor  # [d_sae, n_out, d_out]: writes to n_out sites from the source's own
    b_dec: Tensor  # [d_out]  added to the reconstruction of this layer's output site
    W_skip: Optional[Tensor] = None  # [d_in, d_out], applied as x @ W_skip

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
    """Dictionaries for the layers of one model, keyed by source layer: transcoders (the
    default sites), SAEs or crosscoders (module doc)."""

    kind: Literal["plt", "clt"]  # "plt": each source writes one site; "clt": several
    n_layers: int  # layers of the model the set was trained on
    layers: dict[int, LayerTranscoder]
    model_name: str = ""  # e.g. "gemma-3-270m" (from config.json when known)
    source: str = ""  # where it was loaded from (path or hub reference)
    info: dict = field(default_factory=dict)  # width, l0, affine, dtype, bytes, ... for display
    site_in: str = "mlp_in"  # the site the encoders read (cltrace.models.sites)
    site_out: str = "mlp_out"  # the site the decoders write
    sites: Optional[tuple[int, ...]] = None  # layers W_dec[:, k] indexes (None: every layer)

    @property
    def d_model(self) -> int:
        """The encoders' input width (d_model, but heads x head_dim for an attn_out SAE)."""
        return next(iter(self.layers.values())).W_enc.shape[0]

    @property
    def d_out(self) -> int:
        """The decoders' output width."""
        return next(iter(self.layers.values())).W_dec.shape[-1]

    @property
    def is_transcoder(self) -> bool:
        """Reads the MLP input and writes the MLP output (what attribution graphs need)."""
        return (self.site_in, self.site_out) == ("mlp_in", "mlp_out")

    @property
    def what(self) -> str:
        """A name for messages and tables: "transcoders", "CLT", "SAEs at resid_post",
        "crosscoder at resid_post", or "dictionaries mlp_in -> resid_post"."""
        if self.is_transcoder:
            return "CLT" if self.kind == "clt" else "transcoders"
        if self.site_in == self.site_out:
            return f"{'crosscoder' if self.kind == 'clt' else 'SAEs'} at {self.site_in}"
        return f"dictionaries {self.site_in} -> {self.site_out}"

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
                             dict(self.info), self.site_in, self.site_out, self.sites)

    def _offset(self, source: int, target: int) -> int:
        """k such that ``W_dec[:, k]`` of ``source`` writes to ``target`` (maybe out of range)."""
        if self.sites is None:
            return target - source
        if target not in self.sites or source not in self.sites:
            return -1
        return self.sites.index(target) - self.sites.index(source)

    def targets(self, source: int) -> list[int]:
        """The layers whose output site the features of ``source`` write to."""
        n_out = self.layers[source].n_out
        if self.sites is None:
            return list(range(source, source + n_out))
        i = self.sites.index(source)
        return list(self.sites[i:i + n_out])

    def decoder_slice(self, source: int, target: int) -> Tensor:
        """Decoder rows of source-layer features into target layer: [d_sae, d_out] (a view)."""
        tc = self.layers[source]
        k = self._offset(source, target)
        if not 0 <= k < tc.n_out:
            raise ValueError(f"features of layer {source} do not write to layer {target}")
        return tc.W_dec[:, k, :]

    def sources_writing_to(self, target: int) -> list[int]:
        """Source layers whose features write to ``target`` (just [target] for a PLT)."""
        return [s for s, tc in sorted(self.layers.items())
                if 0 <= self._offset(s, target) < tc.n_out]
