"""End to end: text -> token rows -> model activations -> trained transcoders or SAEs (-> files).

With ``TrainConfig.site`` set, the activations are those at that site and the result is a set of
SAEs at it (written in the Gemma Scope 2 layout with ``hf_hook_point_in`` = the site).

Used by ``cltrace train`` and by the trained starter set (:mod:`cltrace.training.starter`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..models.activations import ActivationSource
from .corpus import token_rows
from .loop import Trainer, TrainResult
from ..models.sites import site_width
from .model import TrainConfig


def checkpoint_path(out: os.PathLike) -> Path:
    """Where the checkpoint of a run writing ``out`` lives: ``{out}.checkpoint.pt``."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint.pt")


# A run shorter than this many optimizer steps, or with a held-out FVU >= 1 (worse than
# predicting the mean), is reported as too short to mean anything.
MIN_MEANINGFUL_STEPS = 100


def train_transcoders(loaded, cfg: TrainConfig, texts: Sequence[str], *,
                      eval_texts: Optional[dict[str, Sequence[str]]] = None,
                      out: Optional[os.PathLike] = None, corpus_name: str = "",
                      resume: bool = False, checkpoint_every: float = 120.0,
                      log: Callable[[str], None] = print, bar: bool = True) -> TrainResult:
    """Train transcoders for ``loaded`` (a :class:`cltrace.models.LoadedModel`) on ``texts``,
    or SAEs at ``cfg.site`` (``TrainConfig(site="resid_post", ...)``).

    ``eval_texts`` names held-out texts (never trained on) to measure the final FVU and L0 on;
    without it the last rows of ``texts`` are held out. With ``out``, the set is written there
    in the Gemma Scope 2 layout and the run checkpoints to :func:`checkpoint_path`
    (``resume=True`` continues from it; a finished run deletes it). The returned set's ``info``
    records provenance and the held-out FVU and L0 per layer on every evaluation text.
    """
    cfg.check()
    model, tok = loaded.model, loaded.tokenizer
    config = getattr(model.config, "text_config", model.config)
    n_layers = config.num_hidden_layers
    d_model = config.hidden_size if cfg.site is None else site_width(config, cfg.site)
    ckpt = checkpoint_path(out) if out is not None else None
    if out is not None and Path(out).exists():
        raise FileExistsError(f"{out} already exists; choose a new --out folder or remove it")
    if ckpt is not None and ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} holds an interrupted run: add --resume to continue it, "
                              "or delete it to start over")
    t0 = time.perf_counter()
    state = None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state is not None and state.get("rows") is not None:
        rows = state["rows"]  # the interrupted run's exact token rows
    else:
        held = eval_texts is not None and any(eval_texts.values())
        rows = token_rows(tok, texts, cfg.ctx, max_tokens=(cfg.corpus_tokens or cfg.tokens)
                          + (0 if held else cfg.eval_tokens))
    layers = list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
    source = activation_source(cfg, model, rows, layers, tok.bos_token_id,
                               cache_dtype=torch.bfloat16 if cfg.cache_activations else None)
    corpus_tokens = rows.shape[0] * source.tokens_per_row
    log(f"corpus {corpus_name or 'texts'}: {len(texts)} documents, {corpus_tokens} tokens in "
        f"{rows.shape[0]} rows of {cfg.ctx} (tokenized in {time.perf_counter() - t0:.1f}s)")
    evals = {}
    for k, v in (eval_texts or {}).items():  # a held-out text too short for one row is skipped
        try:
            ev_rows = token_rows(tok, v, cfg.ctx, max_tokens=cfg.eval_tokens) if v else None
        except ValueError:
            ev_rows = None
        if ev_rows is None:
            log(f"held-out text {k!r} is too short for one row of {cfg.ctx} tokens: not evaluated")
            continue
        evals[k] = activation_source(cfg, model, ev_rows, layers, tok.bos_token_id)
    name = getattr(loaded, "name", "") or getattr(config, "_name_or_path", "")
    trainer = Trainer(cfg, source, n_layers, d_model, model_name=name, log=log, bar=bar,
                      eval_sources=evals)
    if state is not None:
        trainer.load_state(state)
        log(f"resumed from {ckpt} at step {trainer.step}/{cfg.total_steps}")
    log(f"training {len(layers)} {what(cfg)} layer(s){' with affine skip' if cfg.affine_skip else ''}: "
        f"width {cfg.width}, target L0 {cfg.l0:g}, {cfg.tokens} tokens in {cfg.total_steps} "
        f"steps of {cfg.batch_size} ({cfg.tokens / max(1, trainer.n_train_rows * source.tokens_per_row):.2f} "
        f"pass(es) over the {trainer.n_train_rows * source.tokens_per_row} training tokens)")
    trainer.run(checkpoint=ckpt, checkpoint_every=checkpoint_every)
    result = trainer.result()
    info = provenance(cfg, result, corpus_name or "texts", corpus_tokens)
    result.transcoders.info = info
    names = list(result.evals)
    log("  layer  " + "  ".join(f"{n[:28]:>28s}" for n in names) + "   dead")
    for L in sorted(result.fvu):
        cells = [f"FVU {result.evals[n].fvu[L]:6.3f} L0 {result.evals[n].l0[L]:6.1f}" for n in names]
        log(f"  {L:5d}  " + "  ".join(f"{c:>28s}" for c in cells) + f"  {result.dead_frac[L]:5.1%}")
    log(f"trained in {result.train_seconds:.0f}s ({result.tokens / max(result.train_seconds, 1e-9):.0f} "
        f"tokens/s incl. model activations); " + "; ".join(
            f"{n}: FVU {e.fvu_mean:.3f}, L0 {e.l0_mean:.1f} on {e.tokens} tokens"
            for n, e in result.evals.items()))
    if not info["meaningful"]:
        log(f"WARNING: this run is too short to mean anything ({result.steps} steps of "
            f"{cfg.batch_size} tokens, worst held-out FVU {max(result.fvu.values()):.2f}; it needs "
            f">= {MIN_MEANINGFUL_STEPS} steps and every FVU < 1, i.e. better than predicting the "
            f"mean): raise --tokens")
    if out is not None:
        from ..transcoders.write import save_gemmascope

        save_gemmascope(result.transcoders, out, l0=int(round(cfg.l0)))
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()
        log(f"wrote {out}")
    return result


def activation_source(cfg: TrainConfig, model, rows, layers, bos, cache_dtype=None):
    """The source of training activations: MLP inputs and outputs (transcoders) or the
    activation at ``cfg.site`` as input and target (SAEs)."""
    if cfg.site is None:
        return ActivationSource(model, rows, layers, bos, cache_dtype=cache_dtype)
    return ActivationSource(model, rows, layers, bos, cache_dtype=cache_dtype,
                            site_in=cfg.site, site_out=cfg.site)


def what(cfg: TrainConfig) -> str:
    """"PLT", "CLT" or "SAE at resid_post": what ``cfg`` trains."""
    return cfg.kind.upper() if cfg.site is None else f"SAE at {cfg.site}"


def provenance(cfg: TrainConfig, r: TrainResult, corpus: str, corpus_tokens: int) -> dict:
    """The ``info`` of a trained set (also written to config.json as ``cltrace_info``)."""
    mean = lambda d: sum(d.values()) / max(len(d), 1)  # noqa: E731
    meaningful = r.steps >= MIN_MEANINGFUL_STEPS and all(v < 1 for v in r.fvu.values())
    # (judged on the first held-out text, the training-like one: other texts may be far off)
    held = "; ".join(f"{n}: FVU {e.fvu_mean:.3f}, L0 {e.l0_mean:.1f}" for n, e in r.evals.items())
    desc = (f"TRAINED by cltrace: {what(cfg)}{' + affine skip' if cfg.affine_skip else ''}"
            f"{' Matryoshka' if cfg.matryoshka else ''}, width {cfg.width}, JumpReLU, target L0 "
            f"{cfg.l0:g}, {r.tokens} training tokens from {corpus_tokens} tokens of {corpus}; "
            f"{held or 'not evaluated'}{'' if meaningful else ' (TOO SHORT to mean anything)'}")
    return {"trained": True, "synthetic": False, "trainer": "cltrace train",
            "description": desc, "graph_info": {"transcoders": desc},
            "corpus": corpus, "corpus_tokens": corpus_tokens, "tokens": r.tokens, "steps": r.steps,
            "activations": "bfloat16 cache" if cfg.cache_activations else "float32",
            "train_seconds": round(r.train_seconds, 1), "eval_tokens": r.eval_tokens,
            "fvu": {str(L): round(v, 4) for L, v in r.fvu.items()},
            "l0_measured": {str(L): round(v, 2) for L, v in r.l0.items()},
            "dead_frac": {str(L): round(v, 4) for L, v in r.dead_frac.items()},
            "fvu_mean": round(mean(r.fvu), 4), "l0_mean": round(mean(r.l0), 2),
            "meaningful": meaningful,
            "evals": {n: {"tokens": e.tokens, "fvu_mean": round(e.fvu_mean, 4),
                          "l0_mean": round(e.l0_mean, 2),
                          "fvu": {str(L): round(v, 4) for L, v in e.fvu.items()},
                          "l0": {str(L): round(v, 2) for L, v in e.l0.items()}}
                      for n, e in r.evals.items()},
            "config": dataclasses.asdict(cfg)}
