"""The reconstruction of one layer's output site from sparse feature activations.

For any dictionary set (transcoders, CLT, SAEs, crosscoder; :mod:`.base`), the reconstruction
of the output site at layer L is

    recon_L = sum_{S in ts.sources_writing_to(L)} acts_S @ ts.decoder_slice(S, L)
              + b_dec_L (+ x_L @ W_skip_L)

with ``acts_S`` the features read at source layer S and ``x_L`` the input site at L (only
needed with an affine skip). The decode is the compiled ``sparse_decode`` on the rows that fire.
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

from ..ops import SparseActs, sparse_decode
from .base import TranscoderSet


def reconstruct(ts: TranscoderSet, layer: int, acts_by_source: Mapping[int, SparseActs],
                x: Optional[Tensor] = None) -> Tensor:
    """``recon_L [N, d_out]`` (module doc) for the N rows of ``acts_by_source`` (one
    :class:`cltrace.ops.SparseActs` per source writing to ``layer``, each of the same N rows);
    ``x [N, d_in]``: the input site at ``layer``, required when it has ``W_skip``."""
    tc = ts.layers[layer]
    sources = ts.sources_writing_to(layer)
    n = acts_by_source[sources[0]].n_rows
    r = tc.b_dec.expand(n, -1).clone()  # [N, d_out]
    if tc.W_skip is not None:
        if x is None:
            raise ValueError(f"layer {layer} has an affine skip: its input x is needed")
        r += x.to(tc.W_skip.dtype) @ tc.W_skip
    for S in sources:
        a = acts_by_source[S]
        if a.feat_idx.numel():
            k = ts._offset(S, layer)
            W = ts.layers[S].W_dec[:, k:k + 1]  # [d_sae, 1, d_out], a view
            r += sparse_decode(a.row_offsets, a.feat_idx, a.acts, W)[:, 0]
    return r
