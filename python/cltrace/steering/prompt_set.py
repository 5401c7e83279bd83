"""The causal test of an intervention on a set of prompts: a metric before and after, per
prompt, then the mean change with its bootstrap interval and a paired sign-flip test
(:mod:`.stats`).

:func:`run_set` is a plain loop in this process; :func:`cltrace.steering.set_ray.run_set_ray`
runs the same per-prompt measurement (:func:`measure_prompt`) on Ray actors. Each prompt costs
two forward passes (logit-diff, logprob) or two generations (match). The interventions act as in
``cltrace steer``: free mode (the real model with the decoder deltas; transcoder features of a
:class:`~cltrace.replacement.ReplacementModel` or SAE latents of a
:class:`~cltrace.steering.sae.SaeSteering`), or frozen mode (transcoders, logit-diff only).
Positions are resolved against each prompt's tokens; for logprob and match the continuation's
positions are steered too only with ``steer_generated`` (as in generation).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UsageError
from .generation import generate
from .inputs import ModelInput, model_input
from .interventions import Intervention, check_interventions
from .metrics import Metric, metric_ids
from .modes import intervene, steering_hooks
from .stats import PairedSummary, paired_summary


@dataclass
class SetRow:
    """One prompt's metric before and after the interventions."""

    slug: str
    before: float
    after: float
    texts: tuple = ()  # match: (generated before, generated after)

    def to_dict(self) -> dict:
        d = {"slug": self.slug, "before": self.before, "after": self.after,
             "change": self.after - self.before}
        if self.texts:
            d["generated_before"], d["generated_after"] = self.texts
        return d


@dataclass
class SetResult:
    """Every prompt's row and the paired summary of the set."""

    metric: Metric
    rows: list[SetRow]
    summary: PairedSummary
    interventions: list = field(default_factory=list)  # as given (str of each)
    mode: str = "free"


@torch.no_grad()
def forward_logits(rm, seq: ModelInput, ivs: Sequence[Intervention], skip: int,
                   n_ref: Optional[int]) -> Tensor:
    """The real model's logits ``[n_pos, vocab]`` on ``seq`` with the free-mode hooks of
    ``ivs`` (positions resolved against ``n_ref`` tokens; None: the whole sequence)."""
    if not ivs:
        return seq.logits(rm.model)
    hooks = getattr(rm, "steering_hooks", None) or (lambda *a, **kw: steering_hooks(rm, *a, **kw))
    with hooks(list(ivs), skip, n_ref=n_ref):
        return seq.logits(rm.model)


def measure(rm, prompt, metric: Metric, ids, interventions: Sequence[Intervention], *,
            mode: str = "free", freeze_features: bool = False, steer_generated: bool = False,
            generation: Optional[dict] = None) -> tuple[float, float, tuple]:
    """(before, after, texts) of ``metric`` on ``prompt`` (token ids [n_prompt] or an
    :class:`~cltrace.models.multimodal.ImagePrompt`; ``ids`` from
    :func:`~cltrace.steering.metrics.metric_ids`); ``generation``: generate()'s keywords."""
    start = model_input(rm, prompt)
    tokens, n = start.tokens, start.n_pos
    skip = rm.skip_positions_for(tokens)
    ivs = check_interventions(interventions, rm.transcoders, n, skip)
    if mode == "frozen":
        if metric.kind != "logit-diff":
            raise UsageError("--mode frozen measures logit-diff only (the frozen replacement "
                             "model has no continuation)")
        res = intervene(rm, None, ivs, mode="frozen", freeze_features=freeze_features,
                        state=rm.run(prompt))
        a, b = ids
        return (float(res.clean_logits[-1, a] - res.clean_logits[-1, b]),
                float(res.logits[-1, a] - res.logits[-1, b]), ())
    if metric.kind == "logit-diff":
        a, b = ids
        out = [forward_logits(rm, start, v, skip, n)[-1].double() for v in ([], ivs)]  # [vocab]
        return float(out[0][a] - out[0][b]), float(out[1][a] - out[1][b]), ()
    if metric.kind == "logprob":
        cont = torch.tensor(ids, dtype=tokens.dtype, device=tokens.device)  # [n_cont]
        seq = start.extend(rm.model, cont)
        n_ref = None if steer_generated else n
        vals = []
        for v in ([], ivs):
            lp = forward_logits(rm, seq, v, skip, n_ref)[n - 1:-1].double().log_softmax(-1)
            vals.append(float(lp.gather(1, cont[:, None]).sum()))  # [n_cont, vocab] -> sum
        return vals[0], vals[1], ()
    kw = generation or {}
    before = generate(rm, start, [], **kw)
    after = generate(rm, start, ivs, steer_generated=steer_generated, **kw)
    pattern = re.compile(metric.args[0])
    hit = lambda g: float(pattern.search(g.text) is not None)  # noqa: E731
    return hit(before), hit(after), (before.text, after.text)


def measure_prompt(rm, tokenizer, spec, metric: Metric, ids, interventions: Sequence[Intervention],
                   **opts) -> SetRow:
    """The :class:`SetRow` of one prompt (``spec``: a :class:`~cltrace.pipeline.PromptSpec`;
    ``ids`` from :func:`~cltrace.steering.metrics.metric_ids`; ``opts``: :func:`measure`'s
    keywords). What :func:`run_set` does for each prompt, here or in a Ray actor
    (:mod:`.set_ray`); a problem with the prompt is a UsageError naming its slug."""
    from ..models import prompt_tokens

    try:
        _, prompt = prompt_tokens(tokenizer, spec.prompt, spec.chat, spec.messages,
                                  spec.images, getattr(rm, "images", None))
        b, a, texts = measure(rm, prompt, metric, ids, interventions, **opts)
    except UsageError as e:
        raise UsageError(f"prompt {spec.slug!r}: {e}") from None
    return SetRow(spec.slug, b, a, texts)


def summarize(metric: Metric, rows: list[SetRow], interventions: Sequence, mode: str = "free", *,
              n_resamples: int = 10_000, seed: int = 0) -> SetResult:
    """The :class:`SetResult` of the rows (in prompt order): their paired summary
    (:func:`~cltrace.steering.stats.paired_summary`, ``n_resamples`` seeded by ``seed``)."""
    summary = paired_summary([r.before for r in rows], [r.after for r in rows],
                             n_resamples=n_resamples, seed=seed)
    return SetResult(metric, rows, summary, [str(iv) for iv in interventions], mode)


def run_set(rm, tokenizer, specs, metric: Metric, interventions: Sequence[Intervention], *,
            mode: str = "free", freeze_features: bool = False, steer_generated: bool = False,
            generation: Optional[dict] = None, n_resamples: int = 10_000, seed: int = 0,
            say: Callable[..., None] = lambda *a: None) -> SetResult:
    """Measure ``metric`` before and after ``interventions`` on every prompt of ``specs``
    (:class:`~cltrace.pipeline.PromptSpec`, e.g. from a batch JSONL), then summarize the
    changes (:func:`~cltrace.steering.stats.paired_summary`, ``n_resamples`` seeded by
    ``seed``). A problem with one prompt (a position it does not have, too long) is an error
    naming its slug. :func:`cltrace.steering.set_ray.run_set_ray` deals the prompts out to
    Ray actors and gives the same result."""
    if not specs:
        raise UsageError("the prompt set is empty")
    ids = metric_ids(metric, tokenizer)
    opts = dict(mode=mode, freeze_features=freeze_features, steer_generated=steer_generated,
                generation=generation)
    rows = []
    for i, spec in enumerate(specs, 1):
        say(f"[{i}/{len(specs)}] {spec.slug}")
        rows.append(measure_prompt(rm, tokenizer, spec, metric, ids, interventions, **opts))
    return summarize(metric, rows, interventions, mode, n_resamples=n_resamples, seed=seed)


def write_result(result: SetResult, path) -> None:
    """``.json``: one object {metric, mode, interventions, summary, prompts: [rows]};
    ``.jsonl``: one row a line, then a last line {"summary": {...}, metric, ...}. Atomic."""
    import json
    from pathlib import Path

    from ..atomic import atomic_write_text

    head = {"metric": result.metric.text, "mode": result.mode,
            "interventions": result.interventions, "summary": result.summary.to_dict()}
    rows = [r.to_dict() for r in result.rows]
    if Path(path).suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows) + json.dumps(head) + "\n"
    else:
        text = json.dumps(head | {"prompts": rows}, indent=1) + "\n"
    atomic_write_text(path, text)
