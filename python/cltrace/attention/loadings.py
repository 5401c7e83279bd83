"""Head loadings: the split of an edge's weight by the attention heads its paths cross.

An edge ``A[t, s]`` of the graph is a sum over the paths of the frozen linear model from the
source's write (a feature's decoder rows, an error vector, a token embedding, at position k)
to the target's read (an encoder column or a logit direction, at position p). At each layer a
path either stays in the residual stream (and the affine skip of a transcoder, a
same-position linear map) or crosses one attention head, from a key position to a query
position, scaled by that head's frozen pattern entry. So

    A[t, s] = residual + Σ_(L, h) one_hop[L, h] + multi_hop

* ``residual``: the paths through no head (zero unless k = p);
* ``one_hop[L, h]``: the paths through exactly one head, (L, h), from k to p:
  ``gh_L[p] · s_attn[p] P_h[p, k] s_in[k] (1 + w_attn) ∘ W_O,h W_V,g(h) ((1 + w_in) ∘ f_L[k])``
  with ``f_L[k]`` the source's contribution to r_L along head-free paths (forward) and
  ``gh_L[p]`` the target's gradient at the attention output of layer L along head-free paths
  (backward);
* ``multi_hop``: the rest, the paths through two or more heads (``A`` minus the others).

Both head-free passes carry one d_model vector per source or target through the layers (no
position is carried); the one-hop terms of every (target, source, head) are then GEMMs of
T x S x n_heads x head_dim per layer (:func:`one_hop_terms`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..attribution.rows import EdgeRows
from ..frozen.attention import entries
from ..frozen.model import FrozenLinearModel, Seeds


class HeadLoadings(NamedTuple):
    """The head split of E edges (``edge = residual + one_hop.sum((1, 2)) + multi_hop``)."""

    edge: Tensor  # [E]  the edge A[t, s]: the targets' backward rows, or the values given
    residual: Tensor  # [E]  paths through no head
    one_hop: Tensor  # [E, n_layers, n_heads]  paths through exactly that head
    multi_hop: Tensor  # [E]  paths through two or more heads


class Sources(NamedTuple):
    """S sources as the frozen model sees them: where they enter and what they write."""

    pos: Tensor  # [S] int64  position
    embed: Tensor  # [S, d_model]  written into r_0 (a token's embedding; zero otherwise)
    writes: Tensor  # [S, n_layers, d_model]  written into each layer's MLP output m_L


def _skip_forward(fz: FrozenLinearModel, L: int, f: Tensor, pos: Tensor) -> Tensor:
    """The affine skip's share of r_L+1 from ``f [S, d]`` at positions ``pos [S]`` (no heads)."""
    fl = fz.layers[L]
    if fl.W_skip is None:
        return torch.zeros_like(f)
    return (f * fl.k_pre.at(pos)) @ fl.W_skip


def head_free_streams(fz: FrozenLinearModel, src: Sources) -> Tensor:
    """``f [S, n_layers + 1, d]``: each source's contribution to r_L at its own position along
    the paths through no head: ``f_0 = embed``, ``f_L+1 = f_L + skip_L(f_L) + write_L``."""
    S, d = src.embed.shape
    f = src.embed.new_zeros(S, fz.n_layers + 1, d)
    f[:, 0] = src.embed
    for L in range(fz.n_layers):
        f[:, L + 1] = f[:, L] + _skip_forward(fz, L, f[:, L], src.pos) + src.writes[:, L]
    return f


def read_vectors(fz: FrozenLinearModel, targets: Seeds) -> Tensor:
    """Each target's direction through its frozen norm, ``[T, d]``: what it reads from h_L at
    its position (through k_pre at layer L), or from r_n (through the final norm, a logit)."""
    norms = [fl.k_pre for fl in fz.layers] + [fz.k_final]  # indexed by the target's layer
    scale = torch.stack([k.scale[:, 0] for k in norms])  # [n_layers + 1, n_pos]
    gain = torch.stack([k.gain for k in norms])  # [n_layers + 1, d]
    L, p = targets.layer, targets.pos
    return targets.vec.to(fz.dtype) * scale[L, p][:, None] * gain[L]


def head_free_grads(fz: FrozenLinearModel, targets: Seeds) -> Tensor:
    """``gh [T, n_layers, d]``: each target's gradient w.r.t. the attention output of layer L
    (h_L) at its own position along head-free paths; zero above the target.

    Going down from the read (:func:`read_vectors`): ``d/d(h_L) = d/d(r_L+1) + skip_L^T(...)``
    and, with no head, ``d/d(r_L) = d/d(h_L)``; a target at layer L starts at h_L."""
    n, top, pos = fz.n_layers, targets.layer, targets.pos
    read = read_vectors(fz, targets)
    gh = read.new_zeros(read.shape[0], n, read.shape[1])
    gr = torch.where((top == n)[:, None], read, torch.zeros_like(read))  # d/d(r_n)
    for L in range(n - 1, -1, -1):
        fl = fz.layers[L]
        g = gr
        if fl.W_skip is not None:
            fz.fold_gains(fl)
            g = gr + (gr @ fl.W_skip_gain) * fl.k_pre.scale[pos]
        g = torch.where((top == L)[:, None], read, g)
        gh[:, L] = gr = g
    return gh


def one_hop_terms(fz: FrozenLinearModel, gh: Tensor, f: Tensor, t_idx: Tensor, s_idx: Tensor,
                  t_pos: Tensor, s_pos: Tensor, top: Tensor, block: int = 256) -> Tensor:
    """``[E, n_layers, n_heads]``: the paths of E (target, source) pairs through exactly one
    head. ``gh [T, n_layers, d]``: the targets' head-free gradients, ``f [S, n_layers + 1, d]``:
    the sources' head-free streams, ``t_idx``/``s_idx [E]`` each pair's target and source,
    ``t_pos``/``s_pos``/``top [E]`` their positions and the target's layer (heads above a
    target do not reach it).

    Per layer, the heads' output gradients ``go [T, H, hd]`` of the targets and the values
    ``fv [S, n_kv, hd]`` of the sources are formed once, and every (target, head) is dotted
    with every source of its KV head by one GEMM per block of ``block`` targets
    (``[block·rep, hd] @ [hd, S]``); the pairs' entries are gathered from it, times the
    frozen pattern entry and norm scales. T·S·H·hd multiply-adds per layer, at GEMM speed."""
    E, T, S = t_idx.numel(), gh.shape[0], f.shape[0]
    H, n_kv, hd = fz.n_heads, fz.n_kv, fz.head_dim
    rep = H // n_kv
    out = gh.new_zeros(E, fz.n_layers, H)
    order = t_idx.argsort(stable=True)  # the pairs by target, so that a block's are contiguous
    bounds = torch.searchsorted(t_idx[order], torch.arange(0, T + block, block).clamp(max=T)).tolist()
    for L in range(fz.n_layers):
        fl = fz.layers[L]
        fz.fold_gains(fl)
        fv = (f[:, L] @ fl.W_V_gain.T).view(S, n_kv, hd)  # the values each source writes
        for b, t0 in enumerate(range(0, T, block)):
            e = order[bounds[b]:bounds[b + 1]]
            if e.numel() == 0:
                continue
            go = (gh[t0:t0 + block, L] @ fl.W_O_gain).view(-1, n_kv, rep, hd)  # [tb, n_kv, rep, hd]
            dots = torch.stack([(go[:, g].reshape(-1, hd) @ fv[:, g].T).view(-1, rep, S)
                                for g in range(n_kv)], 1)  # [tb, n_kv, rep, S]: (target, head) x source
            d = dots[t_idx[e] - t0, :, :, s_idx[e]].reshape(-1, H)  # [e, H]
            P = entries(fl.pattern, t_pos[e], s_pos[e])  # [e, H]
            scale = fl.k_attn.scale[t_pos[e], 0] * fl.k_in.scale[s_pos[e], 0]
            out[e, L] = torch.where((top[e] >= L)[:, None], P * scale[:, None] * d, 0.0)
    return out


def head_loadings(rows: EdgeRows, targets: Seeds, sources: Sources, t_idx: Tensor,
                  s_idx: Tensor, s_col: Tensor, edge: Optional[Tensor] = None) -> HeadLoadings:
    """The head split of the E edges ``(targets[t_idx[e]], sources[s_idx[e]])``.

    ``targets``: the targets' seeds (:meth:`ReplacementState.feature_seeds`, or logit
    directions at layer n_layers), ``sources``: what they write, ``s_col [S]`` each source's
    column in ``rows`` (:class:`EdgeRows`), which gives the exact edges (the targets' rows,
    computed unless ``edge [E]``, the edges already known, is given)."""
    fz = rows.state.frozen
    dev = fz.W_U.device
    targets, sources = Seeds(*(x.to(dev) for x in targets)), Sources(*(x.to(dev) for x in sources))
    t_idx, s_idx, s_col = t_idx.to(dev), s_idx.to(dev), s_col.to(dev)
    if edge is None:
        edge = rows(targets)[t_idx, s_col[s_idx]]
    edge = edge.to(device=dev, dtype=fz.dtype)
    gh = head_free_grads(fz, targets)  # [T, n, d]
    f = head_free_streams(fz, sources)  # [S, n + 1, d]
    t_pos, s_pos, top = targets.pos[t_idx], sources.pos[s_idx], targets.layer[t_idx]
    read = read_vectors(fz, targets)
    residual = edge.new_zeros(edge.shape)
    same = (t_pos == s_pos).nonzero().flatten()  # the head-free path stays at its position
    residual[same] = (read[t_idx[same]] * f[s_idx[same], top[same]]).sum(-1)
    one = one_hop_terms(fz, gh, f, t_idx, s_idx, t_pos, s_pos, top)
    return HeadLoadings(edge, residual, one, edge - residual - one.sum((1, 2)))
