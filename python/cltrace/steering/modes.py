"""Feature interventions: set, scale or add to transcoder features and see what the model does.

An :class:`Intervention` names a feature ``(layer, feature)``, the positions it acts on and one
operation on its activation ``a``: ``set`` (a -> v), ``scale`` (a -> s * a) or ``add``
(a -> a + v). :func:`intervene` runs a prompt with a list of them, in one of two modes:

* ``"frozen"`` — the local replacement model's view (Ameisen et al. 2025, "Circuit Tracing",
  https://transformer-circuits.pub/2025/attribution-graphs/methods.html § interventions):
  attention patterns and norm denominators stay frozen at their values on the prompt, error
  nodes stay fixed, and downstream features are recomputed with the JumpReLU encoder from
  the new MLP inputs (``freeze_features=True`` holds them fixed too: then the change of every
  target is exactly the graph's edge weight times the change of the source). As the frozen
  model is linear, it is run on the *change* only (per layer L, with ``Δ`` the difference
  from the clean run):

      Δr_0 = 0
      Δh_L = Δr_L + k_attn(attn_P(Δr_L))         frozen pattern P and norms
      Δx_L = k_pre(Δh_L);   x_L = x_L^clean + Δx_L
      a_L  = JumpReLU(x_L W_enc + b_enc), then the interventions of layer L
      Δm_L = Σ_{S ≤ L} decode(a_S − a_S^clean)[S→L] + Δx_L @ W_skip_L
      Δr_L+1 = Δh_L + Δm_L;     logits = logits^clean + k_final(Δr_n) @ W_U^T

  (the frozen model's one forward, :meth:`~cltrace.frozen.FrozenLinearModel.run_layers`),
  so without interventions the real logits come back exactly.
* ``"free"`` — the real model with every norm and attention pattern recomputed: a hook on
  layer L's MLP input computes the intervened features' activations there, and
  ``(new − old) * W_dec[f]`` is added to the MLP output of every layer the feature decodes to
  (one layer for a PLT, L..L+n_out−1 for a CLT). Everything downstream is the real model.

Interventions on the same feature and position compose in list order. Positions in the
skipped chat-template prefix of ``-it`` prompts have no features and are never touched.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..frozen.capture import eager_attention
from ..ops import SparseActs, gather_columns, sparse_decode
from ..replacement.encoding import encode_layer
from .inputs import state_input
from .interventions import Intervention, InterventionResult, by_layer, check_interventions, new_values
from ..errors import UsageError

MODES = ("frozen", "free")


def pre_activations(tcs, mlp_in: Tensor, layer: Tensor, pos: Tensor, feature: Tensor) -> Tensor:
    """Encoder pre-activations ``z = x_L[pos] · W_enc[:, f] + b_enc[f]`` of the given features
    ([k] each) from MLP inputs ``mlp_in [n_layers, n_pos, d_model]``: [k]."""
    layer, pos, feature = (torch.as_tensor(t).reshape(-1).long() for t in (layer, pos, feature))
    out = torch.empty(layer.numel(), dtype=tcs.dtype, device=mlp_in.device)
    for L in layer.unique().tolist():
        sel = (layer == L).nonzero().flatten()
        tc = tcs.layers[L]
        cols = gather_columns(tc.W_enc, feature[sel].to(tc.W_enc.device))  # [k, d_model]
        x = mlp_in[L, pos[sel].to(mlp_in.device)].to(cols.dtype)
        out[sel] = (x * cols).sum(-1) + tc.b_enc[feature[sel]]
    return out


# --- sparse activation edits --------------------------------------------------------------

def column(a: SparseActs, feature: int, n_pos: int) -> Tensor:
    """Dense activations [n_pos] of one feature (0 where inactive)."""
    hit = a.feat_idx == feature
    out = a.acts.new_zeros(n_pos)
    out[a.rows()[hit]] = a.acts[hit]
    return out


def with_columns(a: SparseActs, new: dict[int, Tensor], d_sae: int) -> SparseActs:
    """``a`` with the activations of some features replaced: ``new[f] [n_pos]`` (0 = inactive).
    ``pre_acts`` are dropped (see :func:`with_pre_acts`)."""
    if not new:
        return a
    rows, feats, vals = a.rows(), a.feat_idx, a.acts
    keep = ~torch.isin(feats, torch.tensor(list(new), dtype=feats.dtype, device=feats.device))
    rows, feats, vals = [rows[keep]], [feats[keep]], [vals[keep]]
    for f, v in new.items():
        nz = (v != 0).nonzero().flatten()
        rows.append(nz)
        feats.append(torch.full_like(nz, f))
        vals.append(v[nz].to(a.acts.dtype))
    rows, feats, vals = torch.cat(rows), torch.cat(feats), torch.cat(vals)
    order = (rows * d_sae + feats).argsort()
    counts = torch.bincount(rows, minlength=a.n_rows)
    offsets = torch.zeros(a.n_rows + 1, dtype=torch.int64, device=rows.device)
    offsets[1:] = counts.cumsum(0)
    return SparseActs(offsets, feats[order], vals[order], None)


def with_pre_acts(a: SparseActs, tc, x: Tensor) -> SparseActs:
    """``a`` with ``pre_acts`` = encoder pre-activations of its entries at ``x [n_pos, d]``."""
    if a.pre_acts is not None:
        return a
    if a.feat_idx.numel() == 0:
        return a._replace(pre_acts=a.acts.new_zeros(0))
    cols = gather_columns(tc.W_enc, a.feat_idx)  # [nnz, d_model]
    z = (x[a.rows()].to(cols.dtype) * cols).sum(-1) + tc.b_enc[a.feat_idx]
    return a._replace(pre_acts=z.to(a.acts.dtype))


# --- frozen mode --------------------------------------------------------------------------

@torch.no_grad()
def intervene_frozen(state, interventions: Sequence[Intervention],
                     freeze_features: bool = False) -> InterventionResult:
    """Frozen-mode interventions on a :class:`~cltrace.replacement.ReplacementState`."""
    fz, tcs, n = state.frozen, state.transcoders, state.n_pos
    ivs = check_interventions(interventions, tcs, n, state.skip_positions)
    groups = by_layer(ivs)
    dtype = fz.dtype
    clean_in = state.mlp_in.to(dtype)  # [n_layers, n_pos, d_model]
    dm = torch.zeros_like(clean_in)  # Δ(feature decodes) into each layer's MLP output
    acts, mlp_in = [], []

    def layer_out(L: int, dx: Tensor) -> Tensor:
        """Layer L's features on the changed MLP input, the interventions on them, and the
        change of the decodes they write (into m_L .. m_L+n_out-1)."""
        dx = dx[:, 0]
        x = clean_in[L] + dx  # [n_pos, d_model]
        mlp_in.append(x)
        clean, tc = state.acts[L], tcs.layers.get(L)
        a = clean
        if tc is not None:
            if not freeze_features and dx.any():  # (unchanged input: the clean features)
                a = encode_layer(tc, x, state.skip_positions)
                if _same(a, clean):
                    a = clean
            vals = new_values(groups.get(L, ()), lambda f: column(a, f, n), n, state.skip_positions)
            a = with_columns(a, {f: new for f, (_, new) in vals.items()}, tc.d_sae)
            if a is not clean:
                n_out = min(tc.n_out, fz.n_layers - L)
                dec = _decode(a, tc.W_dec) - _decode(clean, tc.W_dec)  # [n_pos, n_out, d]
                dm[L:L + n_out] += dec[:, :n_out].transpose(0, 1).to(dtype)
            a = with_pre_acts(a, tc, x)
        acts.append(a)
        return dm[L][:, None]

    dr = fz.run_layers(torch.zeros_like(clean_in[0])[:, None], layer_out)[:, 0]  # Δr_n
    dlogits = fz.k_final(dr) @ fz.W_U.to(dtype).T  # [n_pos, vocab]
    logits = (state.logits.to(dtype) + dlogits).to(state.logits.dtype)
    resid = state.capture.resid_final.to(dtype) + dr
    return InterventionResult("frozen", state.tokens, logits, state.logits, acts,
                              torch.stack(mlp_in), resid, ivs)


def _same(a: SparseActs, b: SparseActs) -> bool:
    return (torch.equal(a.row_offsets, b.row_offsets) and torch.equal(a.feat_idx, b.feat_idx)
            and torch.equal(a.acts, b.acts))


def _decode(a: SparseActs, W_dec: Tensor) -> Tensor:
    return sparse_decode(a.row_offsets, a.feat_idx, a.acts, W_dec)  # [n_pos, n_out, d_model]


# --- free mode ----------------------------------------------------------------------------

@contextlib.contextmanager
def steering_hooks(rm, interventions: Sequence[Intervention], skip_positions: int,
                   n_ref: Optional[int] = None) -> Iterator[dict]:
    """Hooks on the real model adding ``(new − old) W_dec`` to MLP outputs (free mode).

    Positions are resolved against ``n_ref`` tokens (default: the length of each forward
    pass). Batch size 1, no KV cache. Yields a dict that, after each forward pass, holds
    ``mlp_in`` (per layer [n_pos, d_model]), ``resid_final`` ([n_pos, d_model], the final
    norm's input) and ``values`` ({(layer, feature): new [n_pos]})."""
    parts, tcs = rm.parts, rm.transcoders
    groups = by_layer(interventions)
    record: dict = {"mlp_in": [None] * parts.n_layers, "values": {}, "resid_final": None}
    pending: dict[int, Tensor] = {}

    def on_mlp_in(L: int):
        def hook(_mod, _args, out):
            x = out[0]  # [n_pos, d_model]
            if L == 0:
                pending.clear()
                record["values"] = {}
            record["mlp_in"][L] = x.detach()
            if L not in groups:
                return None
            tc, n = tcs.layers[L], x.shape[0]
            xe = x.to(tc.W_enc.dtype)

            def old(f: int) -> Tensor:
                z = xe @ tc.W_enc[:, f] + tc.b_enc[f]  # [n_pos]
                z = z * (z > tc.threshold[f])
                z[:skip_positions] = 0
                return z

            vals = new_values(groups[L], old, n_ref or n, skip_positions)
            for o in range(min(tc.n_out, parts.n_layers - L)):
                add = pending.setdefault(L + o, x.new_zeros(n, x.shape[1], dtype=tc.W_dec.dtype))
                for f, (a0, a1) in vals.items():
                    add += (a1 - a0)[:, None] * tc.W_dec[f, o]
            record["values"].update({(L, f): a1 for f, (_, a1) in vals.items()})
            return None
        return hook

    def on_mlp_out(L: int):
        def hook(_mod, _args, out):
            add = pending.get(L)
            return None if add is None else out + add[None].to(out.dtype)
        return hook

    def on_final(_mod, args, _out):
        record["resid_final"] = args[0][0].detach()

    handles = [parts.norm.register_forward_hook(on_final)]
    try:
        for L, layer in enumerate(parts.layers):
            handles.append(layer.pre_feedforward_layernorm.register_forward_hook(on_mlp_in(L)))
            handles.append(layer.post_feedforward_layernorm.register_forward_hook(on_mlp_out(L)))
        yield record
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def intervene_free(rm, state, interventions: Sequence[Intervention]) -> InterventionResult:
    """Free-mode interventions: the real model with decoder deltas added at its MLP outputs."""
    tcs, n, skip_positions = rm.transcoders, state.n_pos, state.skip_positions
    ivs = check_interventions(interventions, tcs, n, skip_positions)
    with steering_hooks(rm, ivs, skip_positions) as rec, eager_attention(rm.model):
        logits = state_input(state).logits(rm.model)  # [n_pos, vocab]
    mlp_in = torch.stack(rec["mlp_in"]).to(rm.dtype)  # [n_layers, n_pos, d_model]
    acts = []
    for L in range(rm.parts.n_layers):
        tc = tcs.layers.get(L)
        if tc is None:
            acts.append(state.acts[L])
            continue
        a = encode_layer(tc, mlp_in[L], skip_positions)
        new = {f: v for (S, f), v in rec["values"].items() if S == L}
        acts.append(with_pre_acts(with_columns(a, new, tc.d_sae), tc, mlp_in[L]))
    return InterventionResult("free", state.tokens, logits, state.logits, acts, mlp_in,
                              rec["resid_final"], ivs)


def intervene(rm, prompt, interventions: Sequence[Intervention], mode: str = "frozen",
              freeze_features: bool = False, state=None) -> InterventionResult:
    """Run ``prompt`` (text, ids, an image prompt, or None with ``state``) under ``interventions``.

    ``mode``: "frozen" (replacement model, see module doc) or "free" (the real model).
    ``freeze_features`` (frozen mode only): hold every non-intervened feature at its clean
    value. ``state``: a :class:`ReplacementState` of the prompt from ``rm.run`` to reuse."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    if freeze_features and mode != "frozen":
        raise UsageError("freeze_features=True needs mode='frozen'")
    if state is None:
        if prompt is None:
            raise UsageError("give a prompt or a state")
        state = rm.run(prompt)
    if mode == "frozen":
        return intervene_frozen(state, interventions, freeze_features)
    return intervene_free(rm, state, interventions)
