"""End-to-end fine-tuning of a dictionary set (transcoders, CLT, SAEs): its training loss plus
the KL between the model's next-token distribution with and without the dictionary spliced in.

Per step, on a batch of token rows ``ids [R, ctx]`` (positions evaluated: ``mask``, every
position but 0 and those holding ``<bos>``, as in :mod:`cltrace.evaluation.run`):

* one clean pass (no gradient) records the input site ``x_S`` of every trained source layer,
  the output site ``y_L`` of every trained layer, and the clean next-token log-probabilities
  ``log p_clean [N, vocab]`` at the ``N`` masked positions;
* the training loss of :class:`cltrace.training.model.TranscoderParams` (normalised MSE +
  L0 penalty + frequency penalty, JumpReLU's straight-through estimator for the thresholds)
  on those activations, which also gives each trained layer's reconstruction ``recon_L``;
* for each spliced layer L *in turn* (one layer spliced per pass, the splice that ``cltrace
  eval``'s loss recovered measures): a pass with the output site of L replaced by ``recon_L``
  at the masked positions, and ``KL_L = mean over positions of sum_v p_clean (log p_clean -
  log p_spliced)``;
* ``loss = training loss + kl_coeff * sum_L KL_L``.

The model is frozen (its parameters take no gradient); the KL's gradient flows through the
layers after L into ``recon_L`` and from there into the dictionary. Memory: each spliced pass
is back-propagated at once in two stages (the unembedding and softmax chunk by chunk into the
final hidden states, then the layers into ``recon_L``, whose gradient is kept), so no
``[N, vocab]`` graph is ever held whole and the passes' graphs are freed one after another.

Weights are trained in the normalised units of the training loop (``x * x_scale``, ``y *
y_scale``, scales measured on the first batch) so that the learning rates mean the same as in
``cltrace train``; each layer's L0 target is its own starting L0 on the first batch (the L0
controller holds it, so a better loss recovered is not bought with more active features).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UsageError
from ..evaluation.run import evaluated_layers
from ..models.anatomy import text_parts
from ..models.sites import site_hooks
from ..transcoders.base import TranscoderSet
from ..transcoders.checks import check_fits
from .model import StepStats, TrainConfig, TranscoderParams

LOGIT_CHUNK = 256  # positions per unembedding chunk


def check_kl_coeff(kl_coeff) -> float:
    """``kl_coeff`` as a float if it is a finite number >= 0, else a UsageError naming it."""
    try:
        v = float(kl_coeff)
    except (TypeError, ValueError):
        raise UsageError(f"--kl-coeff must be a number >= 0, got {kl_coeff!r}") from None
    if not math.isfinite(v) or v < 0:
        raise UsageError(f"--kl-coeff must be a finite number >= 0, got {kl_coeff!r}")
    return v


def check_finetunable(ts: TranscoderSet, layers: Optional[Sequence[int]] = None) -> list[int]:
    """The layers to splice (``layers``, default every layer of the set), or a UsageError when
    the set cannot be fine-tuned: a crosscoder, a set mixing layers with and without an affine
    skip, a layer it lacks, or a CLT missing layers."""
    if ts.sites is not None:
        raise UsageError(f"fine-tuning a {ts.what} is not supported (transcoders, CLTs and SAEs "
                         "are)")
    if ts.site_in != ts.site_out and not ts.is_transcoder:
        raise UsageError(f"fine-tuning {ts.what} is not supported")
    spliced = evaluated_layers(ts, layers)
    if ts.kind == "clt" and sorted(ts.layers) != list(range(ts.n_layers)):
        raise UsageError("a CLT is fine-tuned whole: it must hold every layer of the model")
    skips = {tc.W_skip is not None for tc in ts.layers.values()}
    if len(skips) > 1:
        raise UsageError("the set mixes layers with and without an affine skip")
    return spliced


@contextlib.contextmanager
def _frozen(model):
    """The model's parameters take no gradient inside (restored after)."""
    was = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in was:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in was:
            p.requires_grad_(r)


def _log_probs(lm_head, h: Tensor) -> Tensor:
    logits = lm_head(h)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


@dataclass
class Objective:
    """One batch's fine-tuning loss (floats): ``loss = train_loss + kl_coeff * sum(kl)``."""

    loss: float
    train_loss: float  # reconstruction + sparsity terms (the training loop's loss)
    kl: dict[int, float]  # spliced layer -> KL(p_clean || p_spliced), nats per position
    stats: StepStats


class FineTuner:
    """Fine-tunes ``ts`` on ``model`` (a Gemma 3 causal LM, frozen): :meth:`objective`,
    :meth:`step`, :meth:`result`. ``cfg`` gives the optimizer and loss settings (lr,
    bandwidth, l0_coef, freq_coef, max_freq, l0_control, l0_gain, warmup_steps, decay_frac,
    backend, and ``tokens // batch_size`` steps for the schedule); the dictionary's shape comes
    from ``ts``. ``layers``: the layers spliced (default all of the set's)."""

    def __init__(self, model, ts: TranscoderSet, cfg: TrainConfig, *, kl_coeff: float = 1.0,
                 layers: Optional[Sequence[int]] = None, bos_token_id: Optional[int] = None,
                 total_steps: Optional[int] = None):
        self.kl_coeff = check_kl_coeff(kl_coeff)
        self.spliced = check_finetunable(ts, layers)
        check_fits(ts, model, ts.source or "the set")
        self.model, self.ts, self.bos = model, ts, bos_token_id
        self.parts = text_parts(model)
        self.trained = sorted(ts.layers) if ts.kind == "clt" else self.spliced
        first = ts.layers[self.trained[0]]
        self.cfg = dataclasses.replace(
            cfg, kind=ts.kind, site=None if ts.is_transcoder else ts.site_in,
            affine_skip=first.W_skip is not None, width=ts.d_sae, matryoshka=None,
            layers=self.trained, l0=min(max(cfg.l0, 1e-3), ts.d_sae - 1))
        self.cfg.check()
        self.total_steps = total_steps or self.cfg.total_steps
        self.dtype = torch.float64 if self.parts.lm_head.weight.dtype == torch.float64 else torch.float32
        self.params = TranscoderParams(self.cfg, self.trained, ts.n_layers, ts.d_model).to(self.dtype)
        self.opt = self.sched = None
        self.initialized = False
        self.step_count = 0

    # --- the weights ----------------------------------------------------------------------

    @torch.no_grad()
    def _initialize(self, x: Tensor, y: Tensor) -> None:
        """Normalising scales from raw ``x, y [n_src, N, d]``, the set's weights in those
        units, and each layer's L0 target (its starting L0 on ``x``)."""
        p, d = self.params, x.shape[-1]
        p.x_scale.copy_((d / x.pow(2).sum(-1).mean(-1)).sqrt())
        p.y_scale.copy_((1.0 / y.pow(2).sum(-1).mean(-1).clamp_min(1e-12)).sqrt())
        for i, L in enumerate(self.trained):
            tc = self.ts.layers[L].to(device=p.x_scale.device, dtype=self.dtype)
            sx = float(p.x_scale[i])
            sy = p.y_scale[i:i + tc.n_out]  # the target layers' scales
            p.W_enc[i].copy_(tc.W_enc / sx)
            p.b_enc[i].copy_(tc.b_enc)
            p.log_threshold[i].copy_(tc.threshold.clamp_min(1e-6).log())
            p.W_dec[i].copy_(tc.W_dec * sy[None, :, None])
            p.b_dec[i].copy_(tc.b_dec * float(p.y_scale[i]))
            if tc.W_skip is not None:
                p.W_skip[i].copy_(tc.W_skip * (float(p.y_scale[i]) / sx))
        xn = x * p.x_scale[:, None, None]
        p.l0_targets = [max(v, 1e-3) for v in p.l0_of(xn)]
        self.opt = torch.optim.Adam(p.param_groups(), lr=self.cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.initialized = True

    def _lr_factor(self, step: int) -> float:
        cfg, total = self.cfg, self.total_steps
        warm = min(1.0, (step + 1) / max(1, min(cfg.warmup_steps, total // 10)))  # short runs
        # warm up over a tenth of the run at most
        decay_start = total * (1 - cfg.decay_frac)
        if step < decay_start:
            return warm
        return warm * max(0.0, (total - step) / max(1.0, total - decay_start))

    # --- the objective --------------------------------------------------------------------

    def masks(self, ids: Tensor) -> Tensor:
        """``mask [R, ctx]``: the positions spliced and scored (not 0, not ``<bos>``)."""
        mask = torch.ones_like(ids, dtype=torch.bool)
        mask[:, 0] = False
        if self.bos is not None:
            mask &= ids != self.bos
        return mask

    def objective(self, ids: Tensor, backward: bool = False) -> Objective:
        """The loss on token rows ``ids [R, ctx]`` (module doc); with ``backward`` its
        gradient is added to the dictionary's ``.grad``. The first call also initializes the
        weights from the set (:meth:`_initialize`)."""
        p, ts = self.params, self.ts
        device = self.parts.lm_head.weight.device
        ids = ids.to(device=device, dtype=torch.int64)
        mask = self.masks(ids)
        record = [(ts.site_in, L) for L in self.trained] + [(ts.site_out, L) for L in self.trained]
        with _frozen(self.model):
            with torch.no_grad(), site_hooks(self.parts, record=record) as rec:
                h = self.parts.body(input_ids=ids, use_cache=False).last_hidden_state[mask]  # [N, d]
                lp_clean = [_log_probs(self.parts.lm_head, h[c:c + LOGIT_CHUNK])
                            for c in range(0, h.shape[0], LOGIT_CHUNK)]  # [n, vocab] each
            x = torch.stack([rec[(ts.site_in, L)][mask] for L in self.trained]).to(self.dtype)
            y = torch.stack([rec[(ts.site_out, L)][mask] for L in self.trained]).to(self.dtype)
            del rec, h
            if not self.initialized:
                self._initialize(x, y)
            with torch.set_grad_enabled(backward):
                train_loss, stats, recon = p.loss_and_recon(x * p.x_scale[:, None, None],
                                                            y * p.y_scale[:, None, None])
            kl, total = {}, train_loss
            for L in self.spliced:
                i = self.trained.index(L)
                r = (recon[i] / p.y_scale[i]).detach().requires_grad_(backward)  # [N, d] raw
                kl[L] = self._spliced_kl(ids, mask, L, r, lp_clean, backward)
                if backward:
                    total = total + (recon[i] / p.y_scale[i] * r.grad).sum()
            if backward:
                total.backward()
        loss = float(train_loss.detach()) + self.kl_coeff * sum(kl.values())
        return Objective(loss, float(train_loss.detach()), kl, stats)

    def _spliced_kl(self, ids: Tensor, mask: Tensor, L: int, recon: Tensor,
                    lp_clean: list[Tensor], backward: bool) -> float:
        """KL(p_clean || p_spliced) per position with the output site of ``L`` replaced by
        ``recon [N, d]`` at ``mask``; with ``backward``, ``kl_coeff`` times its gradient is
        left in ``recon.grad``."""
        site = (self.ts.site_out, L)

        def splice(a: Tensor) -> Tensor:
            a = a.clone()
            a[mask] = recon.to(a.dtype)
            return a

        n = int(mask.sum())
        with torch.set_grad_enabled(backward), site_hooks(self.parts, edit={site: splice}):
            h = self.parts.body(input_ids=ids, use_cache=False).last_hidden_state[mask]  # [N, d]
        hd = h.detach().requires_grad_(backward)
        kl = 0.0
        for k, c in enumerate(range(0, n, LOGIT_CHUNK)):
            with torch.set_grad_enabled(backward):
                lc = lp_clean[k]
                part = (lc.exp() * (lc - _log_probs(self.parts.lm_head, hd[c:c + LOGIT_CHUNK]))).sum() / n
                if backward:
                    (self.kl_coeff * part).backward()
            kl += float(part.detach().double())
        if backward:
            h.backward(hd.grad)
        return kl

    # --- training -------------------------------------------------------------------------

    def step(self, ids: Tensor) -> Objective:
        """One Adam step on ``ids [R, ctx]`` (then the L0 controller, on the batch's L0)."""
        if self.initialized:
            self.opt.zero_grad(set_to_none=True)
        obj = self.objective(ids, backward=True)
        levels = self.params.threshold_levels()
        self.opt.step()
        self.sched.step()
        self.params.control_l0(obj.stats.l0, levels)
        self.step_count += 1
        return obj

    @torch.no_grad()
    def result(self, info: Optional[dict] = None) -> TranscoderSet:
        """The set with the trained layers replaced by the fine-tuned ones (raw units, the
        set's dtype); other layers are the set's own."""
        tuned = self.params.to_transcoder_set(self.ts.model_name)
        layers = dict(self.ts.layers)
        for L, tc in tuned.layers.items():
            layers[L] = tc.to(device="cpu", dtype=self.ts.dtype)
        return dataclasses.replace(self.ts, layers=layers, info={**self.ts.info, **(info or {})})


@dataclass
class FinetuneResult:
    transcoders: TranscoderSet
    steps: int
    tokens: int
    seconds: float
    first: Objective  # the first batch's objective (before any step)
    last: Objective  # the last step's


def finetune_set(loaded, ts: TranscoderSet, cfg: TrainConfig, texts: Sequence[str], *,
                 kl_coeff: float = 1.0, layers: Optional[Sequence[int]] = None,
                 out: Optional[os.PathLike] = None, corpus_name: str = "",
                 log: Callable[[str], None] = print, bar: bool = True) -> FinetuneResult:
    """Fine-tune ``ts`` for ``loaded`` (a :class:`cltrace.models.LoadedModel`) on ``texts``
    (rows of ``cfg.ctx`` tokens, ``cfg.batch_size // (ctx - 1)`` rows per step, ``cfg.tokens``
    tokens in all, in a seeded order); with ``out``, write it there in the Gemma Scope 2 layout
    (a temporary folder renamed at the end). Bad input raises a UsageError before any work."""
    from .corpus import token_rows

    kl_coeff = check_kl_coeff(kl_coeff)
    check_finetunable(ts, layers)
    if out is not None and os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose a new --out folder or remove it")
    model, tok = loaded.model, loaded.tokenizer
    per = max(1, cfg.batch_size // (cfg.ctx - 1))
    steps = -(-cfg.tokens // (per * (cfg.ctx - 1)))
    tuner = FineTuner(model, ts, cfg, kl_coeff=kl_coeff, layers=layers,
                      bos_token_id=tok.bos_token_id, total_steps=steps)
    rows = token_rows(tok, texts, cfg.ctx, max_tokens=cfg.tokens)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    log(f"fine-tuning {ts.what} layer(s) {tuner.spliced} (trained: {len(tuner.trained)}) on "
        f"{rows.shape[0]} rows of {cfg.ctx} tokens of {corpus_name or 'texts'}: {steps} steps "
        f"of {per} rows, kl_coeff {kl_coeff:g}")
    pbar = None
    if bar:
        from tqdm import tqdm

        pbar = tqdm(total=steps, unit="step", file=sys.stderr, desc="fine-tuning", dynamic_ncols=True)
    t0 = time.perf_counter()
    first = last = None
    for s in range(steps):
        take = order[(s * per + torch.arange(per)) % rows.shape[0]]
        last = tuner.step(rows[take])
        first = first or last
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix_str(f"loss {last.loss:.4f} KL {sum(last.kl.values()):.4f} "
                                 f"L0 {sum(last.stats.l0) / len(last.stats.l0):.1f}", refresh=False)
    if pbar is not None:
        pbar.close()
    seconds = time.perf_counter() - t0
    info = {"finetuned": {"kl_coeff": kl_coeff, "layers": tuner.spliced, "steps": steps,
                          "tokens": steps * per * (cfg.ctx - 1), "corpus": corpus_name,
                          "seconds": round(seconds, 1),
                          "kl_first": {str(L): round(v, 5) for L, v in first.kl.items()},
                          "kl_last": {str(L): round(v, 5) for L, v in last.kl.items()},
                          "from": ts.source, "lr": cfg.lr}}
    result = tuner.result(info)
    log(f"fine-tuned in {seconds:.0f}s: KL per layer {first.kl} -> {last.kl} (training batches)")
    if out is not None:
        from ..transcoders.write import save_gemmascope

        tags = ts.info.get("l0")  # the input's folder tag, {layer: l0} when loaded
        tags = set(tags.values()) if isinstance(tags, dict) else set()
        l0 = tags.pop() if len(tags) == 1 else int(round(
            sum(tuner.params.l0_targets) / len(tuner.params.l0_targets)))
        save_gemmascope(result, out, l0=l0)
        log(f"wrote {out}")
    return FinetuneResult(result, steps, steps * per * (cfg.ctx - 1), seconds, first, last)
