"""Exact columns of the attribution matrix by a batched forward JVP of the frozen linear model.

A row of the attribution matrix (:class:`cltrace.attribution.EdgeRows`) is a backward pass from
one target; a *column* is the forward pass from one source. For a feature ``s`` at layer
``ℓ_s``, position ``p_s``, activation ``a_s``, inject ``a_s · W_dec[s→ℓ]`` into the MLP output
``m_ℓ`` of every layer it writes to (ℓ ≥ ℓ_s), propagate the change forward through the frozen
linear model (residual stream, attention OV with frozen patterns, frozen norms, affine skip;
features and errors held constant) and read each target: a feature target ``t`` at
``(ℓ_t, p_t)`` reads ``x_{ℓ_t}[p_t] · W_enc[:, t]`` (injections at ℓ ≥ ℓ_t come after that
read, so they drop out as in the edge formula); a logit target reads
``k_final(r_n)[p] · direction``. By linearity this equals the edge ``A[t, s]`` computed by the
backward pass. Attention is causal, so only positions ≥ the smallest source position are
computed: columns of late features are cheap.

Used by the memory-bounded attribution: when a feature becomes visited, its entries in the
rows computed earlier are filled in exactly, so no row ever keeps all active-feature columns.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .model import FrozenLinearModel, Seeds


def forward_columns(fz: FrozenLinearModel, inject: list[tuple[int, Tensor, Tensor, Tensor]],
                    n_cols: int, targets: Seeds) -> Tensor:
    """Effects of ``n_cols`` sources on every target: ``[n_targets, n_cols]``.

    ``inject``: entries ``(layer, col [k], pos [k], vec [k, d_model])`` adding ``vec`` to the
    MLP output ``m_layer`` at ``pos`` of column ``col`` (a feature's ``a · W_dec`` row).
    ``targets``: the rows' seeds (layer ``n_layers`` = a logit direction after the final norm,
    else an encoder column at that layer's MLP input). The residual change is carried
    position-major, ``[n_pos - start, n_cols, d_model]``, from the first source position on,
    by the frozen model's one forward (:meth:`FrozenLinearModel.run_layers`)."""
    dev, dt = fz.W_U.device, fz.dtype
    out = torch.zeros(targets.n, n_cols, dtype=dt, device=dev)
    if not inject or targets.n == 0:
        return out
    start = min(int(p.min()) for _, _, p, _ in inject) if fz.causal else 0
    lo = min(L for L, *_ in inject)
    n = fz.n_pos - start
    top = int(targets.layer.max())
    if top <= lo:  # every target reads before the first injection
        return out

    def inject_into(L: int, r: Tensor) -> None:
        """Add the sources injected into m_L to ``r [n, n_cols, d]`` in place (sparse rows)."""
        for L_in, col, pos, vec in inject:
            if L_in == L:
                r.index_put_((pos - start, col), vec.to(dt), accumulate=True)

    def read(sel: Tensor, y: Tensor, scale: Optional[Tensor] = None) -> None:
        """Targets ``sel`` read ``y [n, C, d]`` (already normed unless ``scale`` [n_pos, d] is
        given) at their positions: [k, C, d] . [k, d] -> out[sel]."""
        pos = targets.pos[sel]
        ys = y[pos - start] if scale is None else y[pos - start] * scale[pos][:, None]
        out[sel] = torch.einsum("kcd,kd->kc", ys, targets.vec[sel].to(dt))

    def layer_out(L: int, x: Tensor) -> Optional[Tensor]:
        sel = ((targets.layer == L) & (targets.pos >= start)).nonzero().flatten()
        if sel.numel():
            read(sel, x)  # the MLP input x_L = k_pre(h_L); injections at L come after it
        return None

    r0 = torch.zeros(n, n_cols, fz.d_model, dtype=dt, device=dev)
    inject_into(lo, r0)  # m_lo: nothing upstream of it changes
    r = fz.run_layers(r0, layer_out, start=start, first=lo + 1, stop=min(top + 1, fz.n_layers),
                      after=inject_into)
    sel = ((targets.layer == fz.n_layers) & (targets.pos >= start)).nonzero().flatten()
    if top == fz.n_layers and sel.numel():
        read(sel, r, fz.k_final.scale * fz.k_final.gain)
    return out


def feature_injections(state, layer: Tensor, pos: Tensor, feature: Tensor,
                       act: Tensor) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """``inject`` entries of :func:`forward_columns` for features (one column each):
    ``a · W_dec[feature → L]`` at every layer L the feature's layer writes to."""
    tcs, out = state.transcoders, []
    cols = torch.arange(layer.numel(), device=layer.device)
    for L in range(state.n_layers):
        for S in tcs.sources_writing_to(L):
            sel = (layer == S).nonzero().flatten()
            if sel.numel() == 0:
                continue
            W = tcs.decoder_slice(S, L)  # [d_sae, d_model]
            vec = W[feature[sel].to(W.device)].to(state.frozen.dtype) * act[sel, None].to(state.frozen.dtype)
            out.append((L, cols[sel], pos[sel], vec))
    return out
