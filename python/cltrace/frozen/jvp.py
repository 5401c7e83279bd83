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

import torch
from torch import Tensor

from .model import FrozenLayer, FrozenLinearModel, FrozenNorm, Seeds
from .attention import mix


def _attn_delta(fz: FrozenLinearModel, fl: FrozenLayer, r: Tensor, start: int) -> Tensor:
    """``r + `` the change of the post-scaled attention output for a residual change
    ``r [n, C, d]`` (position-major, positions ``start..``): with the norm gains folded into
    W_V / W_O and the scales into the pattern, two GEMMs, the pattern product and two copies."""
    n, C, d = r.shape
    rep, hd = fz.n_heads // fz.n_kv, fz.head_dim
    fz.fold_gains(fl)
    v = (r.view(n * C, d) @ fl.W_V_gain.T).view(n, C, fz.n_kv, hd)  # [n, C, n_kv, hd]
    v = v.permute(2, 0, 1, 3).reshape(fz.n_kv, n, C * hd)
    z = mix(fl.pattern, v, start, fl.k_attn.scale[:, 0], fl.k_in.scale[:, 0])  # [n_kv, rep, n, C * hd]
    z = z.view(fz.n_kv, rep, n, C, hd).permute(2, 3, 0, 1, 4).reshape(n * C, fz.n_heads * hd)
    return torch.addmm(r.view(n * C, d), z, fl.W_O_gain.T).view(n, C, d)


def forward_columns(fz: FrozenLinearModel, inject: list[tuple[int, Tensor, Tensor, Tensor]],
                    n_cols: int, targets: Seeds) -> Tensor:
    """Effects of ``n_cols`` sources on every target: ``[n_targets, n_cols]``.

    ``inject``: entries ``(layer, col [k], pos [k], vec [k, d_model])`` adding ``vec`` to the
    MLP output ``m_layer`` at ``pos`` of column ``col`` (a feature's ``a · W_dec`` row).
    ``targets``: the rows' seeds (layer ``n_layers`` = a logit direction after the final norm,
    else an encoder column at that layer's MLP input). The residual change is carried
    position-major, ``[n_pos - start, n_cols, d_model]``, from the first source position on."""
    dev, dt = fz.W_U.device, fz.dtype
    out = torch.zeros(targets.n, n_cols, dtype=dt, device=dev)
    if not inject or targets.n == 0:
        return out
    start = min(int(p.min()) for _, _, p, _ in inject) if fz.causal else 0
    lo = min(L for L, *_ in inject)
    n = fz.n_pos - start
    r = torch.zeros(n, n_cols, fz.d_model, dtype=dt, device=dev)  # change of r_L
    live = False
    top = int(targets.layer.max())

    def read(sel: Tensor, y: Tensor, k: FrozenNorm) -> None:
        """Targets ``sel`` read ``k(y)`` at their positions: [k, C, d] . [k, d] -> out[sel]."""
        pos = targets.pos[sel]
        ys = y[pos - start] * (k.scale[pos] * k.gain)[:, None]  # [k, n_cols, d]
        out[sel] = torch.einsum("kcd,kd->kc", ys, targets.vec[sel].to(dt))

    for L in range(lo, min(top + 1, fz.n_layers)):
        fl = fz.layers[L]
        h = _attn_delta(fz, fl, r, start) if live else r
        sel = ((targets.layer == L) & (targets.pos >= start)).nonzero().flatten()
        if live and sel.numel():
            read(sel, h, fl.k_pre)  # the MLP input x_L = k_pre(h_L)
        if fl.W_skip is not None and live:
            fz.fold_gains(fl)  # m += k_pre(h) @ W_skip
            scale = fl.k_pre.scale[start:, :, None]  # [n, 1, 1]
            r = torch.addcmul(h, (h.view(-1, fz.d_model) @ fl.W_skip_gain.T).view(h.shape), scale)
        else:
            r = h
        for L_in, col, pos, vec in inject:
            if L_in == L:
                r.index_put_((pos - start, col), vec.to(dt), accumulate=True)
                live = True
    sel = ((targets.layer == fz.n_layers) & (targets.pos >= start)).nonzero().flatten()
    if top == fz.n_layers and live and sel.numel():
        read(sel, r, fz.k_final)
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
