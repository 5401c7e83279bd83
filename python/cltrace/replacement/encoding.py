"""Transcoder features, reconstructions and error vectors on captured MLP inputs and outputs.

In the local replacement model (https://transformer-circuits.pub/2025/attribution-graphs/methods.html)
each MLP output ``m_L`` is replaced by the transcoder reconstruction plus an *error node*:

    acts_S  = JumpReLU(x_S @ W_enc_S + b_enc_S)                    (compiled ``jumprelu_encode``)
    recon_L = sum_{S <= L} acts_S @ W_dec_S[:, L - S] + b_dec_L + x_L @ W_skip_L
    error_L = m_L - recon_L

(the decode is the compiled, CLT-aware ``sparse_decode``; a PLT is a CLT with ``n_out = 1``).
*Positions without nodes* (the first ``skip_positions``: ``<bos>``, and the chat-template prefix of
``-it`` prompts, circuit-tracer's ``zero_positions``) get no features and no error node: their
MLP output minus the affine skip (which stays a linear path there, as in circuit-tracer) is a
constant of the linearisation, kept in ``Reconstruction.bias`` like ``b_dec``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import SparseActs, jumprelu_encode, sparse_decode
from ..transcoders.base import TranscoderSet
from ..transcoders.checks import check_decoder_rows


class Reconstruction(NamedTuple):
    """The transcoder reconstruction of every layer's MLP output, split by origin."""

    features: Tensor  # [n_layers, n_pos, d_model]  sum of feature decodes into each layer
    bias: Tensor  # [n_layers, n_pos, d_model]  constants: b_dec_L at the positions with nodes,
    #               m_L - skip at the positions without nodes
    skip: Tensor  # [n_layers, n_pos, d_model]  x_L @ W_skip_L (zero without a skip)

    @property
    def total(self) -> Tensor:
        return self.features + self.bias + self.skip  # [n_layers, n_pos, d_model]


def empty_acts(n_rows: int, like: Tensor) -> SparseActs:
    """SparseActs with no active entry in ``n_rows`` rows."""
    i64 = dict(dtype=torch.int64, device=like.device)
    return SparseActs(torch.zeros(n_rows + 1, **i64), torch.zeros(0, **i64),
                      like.new_zeros(0), like.new_zeros(0))


def encode_layer(tc, x: Tensor, skip_positions: int) -> SparseActs:
    """JumpReLU features of one layer's MLP input ``x [n_pos, d_model]``: CSR over positions,
    the first ``skip_positions`` rows empty."""
    n_pos = x.shape[0]
    if skip_positions >= n_pos:
        return empty_acts(n_pos, x.new_zeros(0, dtype=tc.W_enc.dtype))
    a = jumprelu_encode(x[skip_positions:].to(tc.W_enc.dtype), tc.W_enc, tc.b_enc, tc.threshold)
    offsets = torch.cat([a.row_offsets.new_zeros(skip_positions), a.row_offsets])
    return SparseActs(offsets, a.feat_idx, a.acts, a.pre_acts)


def encode(tcs: TranscoderSet, mlp_in: Tensor, skip_positions: int) -> list[SparseActs]:
    """Active features of every layer: ``mlp_in [n_layers, n_pos, d]`` -> n_layers SparseActs
    (rows are positions; layers without a transcoder get empty activations)."""
    n_layers, n_pos, _ = mlp_in.shape
    return [encode_layer(tcs.layers[L], mlp_in[L], skip_positions) if L in tcs.layers
            else empty_acts(n_pos, mlp_in.new_zeros(0, dtype=tcs.dtype)) for L in range(n_layers)]


def reconstruct(tcs: TranscoderSet, acts: list[SparseActs], mlp_in: Tensor, mlp_out: Tensor,
                skip_positions: int) -> Reconstruction:
    """Reconstructions of every layer's MLP output from ``acts`` and ``mlp_in [n_layers, n_pos, d]``;
    at the first ``skip_positions`` positions (no nodes) the true ``mlp_out [n_layers, n_pos, d]``."""
    n_layers, n_pos, d_model = mlp_in.shape
    dtype = tcs.dtype
    features = mlp_in.new_zeros(n_layers, n_pos, d_model, dtype=dtype)
    bias, skip = torch.zeros_like(features), torch.zeros_like(features)
    for S, tc in sorted(tcs.layers.items()):
        a = acts[S]
        if a.feat_idx.numel():
            dec = sparse_decode(a.row_offsets, a.feat_idx, a.acts, tc.W_dec)  # [n_pos, n_out, d]
            if not bool(torch.isfinite(dec).all()):  # only the rows read: no scan of W_dec
                check_decoder_rows(tcs, S, a.feat_idx)
            n_out = min(tc.n_out, n_layers - S)
            features[S:S + n_out] += dec[:, :n_out].transpose(0, 1)
        bias[S, skip_positions:] = tc.b_dec
        if tc.W_skip is not None:  # linear in x: part of the frozen model at every position
            skip[S] = mlp_in[S].to(dtype) @ tc.W_skip
    # positions without nodes: what the skip does not explain is a constant (no error node)
    bias[:, :skip_positions] = mlp_out[:, :skip_positions].to(dtype) - skip[:, :skip_positions]
    return Reconstruction(features, bias, skip)


def skip_matrices(tcs: TranscoderSet, n_layers: int) -> list[Optional[Tensor]]:
    """``W_skip`` of every layer (None where a layer has no transcoder or no skip)."""
    return [tcs.layers[L].W_skip if L in tcs.layers else None for L in range(n_layers)]
