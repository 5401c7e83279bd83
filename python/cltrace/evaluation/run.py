"""The passes of an evaluation: one clean pass per batch of rows, then per evaluated layer one
pass with its output site spliced and one with it zero-ablated.

A set reads the site ``site_in`` and writes ``site_out`` (:mod:`cltrace.models.sites`): a
transcoder reads the MLP input (``pre_feedforward_layernorm`` output) and writes the MLP output
(``post_feedforward_layernorm`` output); an SAE reads and writes one site: ``resid_post`` (the
block's output), ``attn_out`` (``o_proj``'s input, the heads' concatenated outputs) or
``mlp_out``; a crosscoder reads and writes ``resid_post`` of its layers. The clean pass records
(:func:`cltrace.models.sites.site_hooks`) the input site ``x_S`` of every source layer needed and
the output site ``y_L`` of every evaluated layer. The features of each source layer are encoded
once from it (the compiled ``jumprelu_encode``) and decoded into the reconstruction of every
evaluated layer (:func:`cltrace.transcoders.reconstruct.reconstruct`)

    recon_L = sum_{S writing to L} acts_S @ W_dec_S[:, k(S, L)] + b_dec_L (+ x_L @ W_skip_L)

(S <= L: a CLT's every earlier layer, a crosscoder's earlier layers, else S = L). A spliced
pass replaces the output site of layer L by ``recon_L``; the zero-ablated pass by 0 (for
``attn_out`` that removes the layer's attention output, as o_proj has no bias and the norm of
0 is 0; for ``resid_post`` it zeroes the whole residual stream after the block: the
SAELens / Gemma Scope convention, a far larger damage than zeroing one block's write, see
docs/method.md). Splicing layer L changes nothing before L's output site, and every input
site ``x_S`` with S <= L comes before it in the forward pass (an SAE's input is its own output
site, read before the replacement), so the inputs in the spliced pass are those of the clean
pass and ``recon_L`` computed from the clean pass is the reconstruction from the spliced pass's
own inputs. Evaluated positions are all but those holding ``<bos>`` (position 0 of every row and
document starts inside a row): only they enter a statistic, and only they are spliced or
ablated (``<bos>`` keeps the model's own activation, as the replacement model keeps it at
positions without nodes). The cross-entropy is that of the next token predicted at each
evaluated position whose next token is in the row and is not ``<bos>``; the logits are made
in chunks of positions (never ``[rows, ctx, vocab]`` at once).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UsageError
from ..settings import format_layers
from ..models.anatomy import text_parts
from ..models.sites import site_hooks
from ..ops import jumprelu_encode
from ..transcoders.base import TranscoderSet
from ..transcoders.checks import check_fits
from ..transcoders.reconstruct import reconstruct
from .metrics import FVUSums, percentiles
from .report import EvalReport, LayerEval
from .settings import EvalSettings

L0_QUANTILES = (0.1, 0.5, 0.9)  # the L0 percentiles reported (and the max)
LOGIT_CHUNK = 256  # positions per unembedding chunk in the cross-entropy


def evaluated_layers(ts: TranscoderSet, layers: Optional[Sequence[int]] = None) -> list[int]:
    """The layers evaluated: ``layers`` (each must be a source layer of the set), default every
    source layer of the set."""
    have = sorted(ts.layers)
    if layers is None:
        return have
    missing = sorted(set(layers) - set(have))
    if missing:
        raise UsageError(f"--layers: the set ({ts.what}) has no dictionary at layer(s) "
                         f"{format_layers(missing)} (it has {format_layers(have)})")
    return sorted(set(layers))


def _put(mask: Tensor, values: Tensor) -> Callable[[Tensor], Tensor]:
    """An edit for :func:`site_hooks`: the activation with ``values [n_masked, width]`` at the
    positions ``mask [B, ctx]`` (a zero-dimensional ``values`` is broadcast)."""
    def edit(a: Tensor) -> Tensor:
        a = a.clone()
        a[mask] = values.to(a.dtype)
        return a
    return edit


def _nll_sum(parts, ids: Tensor, ce_mask: Tensor) -> float:
    """Sum of next-token negative log-likelihoods (nats, fp64) at the positions ``ce_mask
    [B, ctx - 1]`` of one pass of ``ids [B, ctx]`` (hooks in place)."""
    h = parts.body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][ce_mask]  # [N, d]
    targets = ids[:, 1:][ce_mask]
    total = 0.0
    for c in range(0, h.shape[0], LOGIT_CHUNK):
        logits = parts.lm_head(h[c:c + LOGIT_CHUNK])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        lp = logits.log_softmax(-1).gather(-1, targets[c:c + LOGIT_CHUNK, None])
        total -= float(lp.double().sum())
    return total


@torch.no_grad()
def evaluate_set(model, transcoders: TranscoderSet, tokens: Tensor,
                 settings: Optional[EvalSettings] = None, *, bos_token_id: Optional[int] = None,
                 model_name: str = "", set_name: str = "", bar: bool = False,
                 progress: Optional[Callable[[int], None]] = None) -> EvalReport:
    """Evaluate the dictionary set ``transcoders`` (transcoders, CLT, SAEs, crosscoder) on the token rows ``tokens [n_rows, ctx]`` (each row starting
    with ``<bos>``, e.g. :func:`cltrace.training.corpus.token_rows`) of ``model`` (a Gemma 3
    causal LM, or a :class:`cltrace.models.LoadedModel`, whose tokenizer then gives
    ``bos_token_id`` and whose name ``model_name``). ``settings.layers`` restricts the layers,
    ``settings.dense_threshold`` defines a dense feature and ``settings.batch`` the rows per
    pass; the first ``settings.tokens`` evaluated positions (row by row) are evaluated and the
    rest of the rows ignored (``settings.ctx`` is the row length ``cltrace eval`` cut).
    ``bar``: a tqdm progress bar over the passes on stderr; ``progress(passes_done)`` is called
    after each pass. See the module doc for the passes and
    docs/method.md for the definitions."""
    settings = (settings or EvalSettings()).check()
    if hasattr(model, "tokenizer") and hasattr(model, "model"):  # a LoadedModel
        tok = model.tokenizer
        if bos_token_id is None and tok is not None:
            bos_token_id = getattr(tok, "bos_token_id", None)
        model_name = model_name or getattr(model, "name", "")
        model = model.model
    parts = text_parts(model)
    ts = full = transcoders
    check_fits(ts, model, set_name or ts.source or "transcoders")
    layers = evaluated_layers(ts, settings.layers)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] < 2 or tokens.shape[0] < 1:
        raise UsageError(f"expected token rows [n_rows, ctx >= 2], got shape {tuple(tokens.shape)}")
    device = parts.lm_head.weight.device
    sources = sorted({S for L in layers for S in ts.sources_writing_to(L)})
    # the sources needed, on the model's device (tensors already there are not copied)
    ts = dataclasses.replace(ts, layers={S: ts.layers[S].to(device=device) for S in sources})
    tcs = ts.layers
    site_in, site_out = ts.site_in, ts.site_out

    fvu = {L: FVUSums() for L in layers}
    counts: dict[int, list[Tensor]] = {L: [] for L in layers}  # active features per token
    fires = {L: torch.zeros(tcs[L].d_sae, dtype=torch.int64, device=device) for L in layers}
    ce_clean, ce_splice, ce_zero = 0.0, {L: 0.0 for L in layers}, {L: 0.0 for L in layers}
    n_tokens = n_ce = 0

    evaluated = torch.ones_like(tokens, dtype=torch.bool)  # rows needed for settings.tokens
    evaluated[:, 0] = False
    if bos_token_id is not None:
        evaluated &= tokens != bos_token_id
    per_row = evaluated.sum(1).cumsum(0)
    n_rows = min(int((per_row < settings.tokens).sum()) + 1, tokens.shape[0])
    tokens = tokens[:n_rows]
    batches = [tokens[b:b + settings.batch] for b in range(0, n_rows, settings.batch)]
    total_passes = len(batches) * (1 + 2 * len(layers))
    tq = None
    if bar:
        from tqdm import tqdm
        import sys

        tq = tqdm(total=total_passes, unit="pass", desc="evaluating", file=sys.stderr,
                  dynamic_ncols=True)
    done = 0

    def step():
        nonlocal done
        done += 1
        if tq is not None:
            tq.update(1)
        if progress is not None:
            progress(done)

    try:
        for rows in batches:
            ids = rows.to(device=device, dtype=torch.int64)
            mask = torch.ones_like(ids, dtype=torch.bool)
            mask[:, 0] = False
            if bos_token_id is not None:
                mask &= ids != bos_token_id
            budget = settings.tokens - n_tokens  # the first settings.tokens positions only
            mask &= (mask.flatten().cumsum(0) <= budget).view_as(mask)
            ce_mask = mask[:, :-1].clone()
            if bos_token_id is not None:
                ce_mask &= ids[:, 1:] != bos_token_id
            T, n = int(mask.sum()), int(ce_mask.sum())
            n_tokens += T
            n_ce += n

            record = [(site_in, S) for S in sources] + [(site_out, L) for L in layers]
            with site_hooks(parts, record=record) as rec:
                ce_clean += _nll_sum(parts, ids, ce_mask)
            step()

            acts = {}
            for S in sources:
                tc = tcs[S]
                x = rec[(site_in, S)][mask].to(tc.W_enc.dtype)  # [T, d_in]
                a = acts[S] = jumprelu_encode(x, tc.W_enc, tc.b_enc, tc.threshold)
                if S in fires:
                    nz = a.acts != 0
                    cs = torch.cat([nz.new_zeros(1, dtype=torch.int64), nz.long().cumsum(0)])
                    counts[S].append((cs[a.row_offsets[1:]] - cs[a.row_offsets[:-1]]).cpu())
                    fires[S] += torch.bincount(a.feat_idx[nz], minlength=tc.d_sae)
            recon = {}
            for L in layers:
                x = rec[(site_in, L)][mask] if tcs[L].W_skip is not None else None
                recon[L] = reconstruct(ts, L, acts, x)  # [T, d_out]
                fvu[L].add(recon[L], rec[(site_out, L)][mask])
            del rec, acts

            for L in layers:
                with site_hooks(parts, edit={(site_out, L): _put(mask, recon[L])}):
                    ce_splice[L] += _nll_sum(parts, ids, ce_mask)
                step()
                with site_hooks(parts, edit={(site_out, L): _put(mask, recon[L].new_zeros(()))}):
                    ce_zero[L] += _nll_sum(parts, ids, ce_mask)
                step()
    finally:
        if tq is not None:
            tq.close()

    clean = ce_clean / n_ce if n_ce else float("nan")
    out = []
    for L in layers:
        c = torch.cat(counts[L]) if counts[L] else torch.zeros(0)
        p10, p50, p90 = percentiles(c, L0_QUANTILES)
        freq = fires[L].double().cpu() / max(n_tokens, 1)
        splice = ce_splice[L] / n_ce if n_ce else float("nan")
        zero = ce_zero[L] / n_ce if n_ce else float("nan")
        gap = zero - clean
        out.append(LayerEval(
            layer=L, fvu=fvu[L].value, l0=float(c.double().mean()) if c.numel() else float("nan"),
            l0_p10=p10, l0_p50=p50, l0_p90=p90, l0_max=float(c.max()) if c.numel() else float("nan"),
            dead=float((fires[L] == 0).double().mean()),
            dense=float((freq > settings.dense_threshold).double().mean()),
            ce_splice=splice, ce_zero=zero, delta_ce=splice - clean,
            loss_recovered=(zero - splice) / gap if gap != 0 and math.isfinite(gap) else float("nan")))
    return EvalReport(layers=out, clean_ce=clean, tokens=n_tokens, ce_tokens=n_ce, rows=n_rows,
                      ctx=int(tokens.shape[1]), settings=settings, model_name=model_name,
                      set_name=set_name or str(full.info.get("set_id", "") or full.source),
                      set_kind=full.kind, set_what=full.what, site_in=full.site_in,
                      site_out=full.site_out, d_sae=full.d_sae,
                      skip=any(tc.W_skip is not None for tc in full.layers.values()))
