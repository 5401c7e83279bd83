"""Transcoder features, reconstructions and error vectors on captured MLP inputs and outputs.

In the local replacement model (https://transformer-circuits.pub/2025/attribution-graphs/methods.html)
each MLP output ``m_L`` is replaced by the transcoder reconstruction plus an *error node*:

    acts_S  = JumpReLU(x_S @ W_enc_S + b_enc_S)                    (compiled ``jumprelu_encode``)
    recon_L = sum_{S <= L} acts_S @ W_dec_S[:, L - S] + b_dec_L + x_L @ W_skip_L
    error_L = m_L - recon_L

(the decode is the compiled, CLT-aware ``sparse_decode``; a PLT is a CLT with ``n_out = 1``).
Positions listed as *skipped* (the chat-template prefix of ``-it`` models) get no features, no
``b_dec`` and no skip: their whole MLP output is the error.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import SparseActs, jumprelu_encode, sparse_decode
from ..transcoders.base import TranscoderSet


class Reconstruction(NamedTuple):
    """The transcoder reconstruction of every layer's MLP output, split by origin."""

    features: Tensor  # [n_layers, n_pos, d_model]  sum of feature decodes into each layer
    bias: Tensor  # [n_layers, n_pos, d_model]  b_dec_L at the positions that have features
    skip: Tensor  # [n_layers, n_pos, d_model]  x_L @ W_skip_L (zero without a skip)

    @property
    def total(self) -> Tensor:
        return self.features + self.bias + self.skip  # [n_layers, n_pos, d_model]


def empty_acts(n_rows: int, like: Tensor) -> SparseActs:
    """SparseActs with no active entry in ``n_rows`` rows."""
    i64 = dict(dtype=torch.int64, device=like.device)
    return SparseActs(torch.zeros(n_rows + 1, **i64), torch.zeros(0, **i64),
                      like.new_zeros(0), like.new_zeros(0))


def encode(tcs: TranscoderSet, mlp_in: Tensor, n_skip: int) -> list[SparseActs]:
    """Active features of every layer: ``mlp_in [n_layers, n_pos, d]`` -> n_layers SparseActs.

    Rows are positions; the first ``n_skip`` rows are empty. Layers without a transcoder get
    empty activations.
    """
    n_layers, n_pos, _ = mlp_in.shape
    out = []
    for L in range(n_layers):
        tc = tcs.layers.get(L)
        if tc is None or n_skip >= n_pos:
            out.append(empty_acts(n_pos, mlp_in.new_zeros(0, dtype=tcs.dtype)))
            continue
        x = mlp_in[L, n_skip:].to(tc.W_enc.dtype)  # [n_pos - n_skip, d_model]
        a = jumprelu_encode(x, tc.W_enc, tc.b_enc, tc.threshold)
        offsets = torch.cat([a.row_offsets.new_zeros(n_skip), a.row_offsets])
        out.append(SparseActs(offsets, a.feat_idx, a.acts, a.pre_acts))
    return out


def reconstruct(tcs: TranscoderSet, acts: list[SparseActs], mlp_in: Tensor,
                n_skip: int) -> Reconstruction:
    """Reconstructions of every layer's MLP output from ``acts`` and ``mlp_in [n_layers, n_pos, d]``."""
    n_layers, n_pos, d_model = mlp_in.shape
    dtype = tcs.dtype
    features = mlp_in.new_zeros(n_layers, n_pos, d_model, dtype=dtype)
    bias, skip = torch.zeros_like(features), torch.zeros_like(features)
    for S, tc in sorted(tcs.layers.items()):
        a = acts[S]
        if a.feat_idx.numel():
            dec = sparse_decode(a.row_offsets, a.feat_idx, a.acts, tc.W_dec)  # [n_pos, n_out, d]
            n_out = min(tc.n_out, n_layers - S)
            features[S:S + n_out] += dec[:, :n_out].transpose(0, 1)
        bias[S, n_skip:] = tc.b_dec
        if tc.W_skip is not None:
            skip[S, n_skip:] = mlp_in[S, n_skip:].to(dtype) @ tc.W_skip
    return Reconstruction(features, bias, skip)


def skip_matrices(tcs: TranscoderSet, n_layers: int) -> list[Optional[Tensor]]:
    """``W_skip`` of every layer (None where a layer has no transcoder or no skip)."""
    return [tcs.layers[L].W_skip if L in tcs.layers else None for L in range(n_layers)]


def transcoders_to(tcs: TranscoderSet, device=None, dtype=None) -> TranscoderSet:
    """A copy of the set whose tensors are on ``device`` in ``dtype`` (no copy when already)."""
    def mv(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(device=device, dtype=dtype)

    layers = {L: type(tc)(W_enc=mv(tc.W_enc), b_enc=mv(tc.b_enc), threshold=mv(tc.threshold),
                          W_dec=mv(tc.W_dec), b_dec=mv(tc.b_dec), W_skip=mv(tc.W_skip))
              for L, tc in tcs.layers.items()}
    return TranscoderSet(kind=tcs.kind, n_layers=tcs.n_layers, layers=layers,
                         model_name=tcs.model_name, source=tcs.source, info=dict(tcs.info))
