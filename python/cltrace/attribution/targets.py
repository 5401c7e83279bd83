"""Logit targets of an attribution graph: salient next tokens, given tokens, custom directions.

A target is a direction in the residual stream after the final norm; a token's direction is
its unembedding row minus the vocabulary mean (so the target's value is its logit minus the
mean logit). Salient targets are the top tokens at the last position up to ``desired_logit_prob``
cumulative probability, at most ``max_n_logits`` (Ameisen et al. 2025; circuit-tracer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from ..errors import UsageError


@dataclass
class LogitTarget:
    """One logit node: what it is called, its id in node ids, its direction and weight."""

    label: str  # token text, or a description such as '" Paris" - " London"'
    token_id: int  # vocabulary id; custom directions use vocab_size + i
    vec: Tensor  # [d_model] direction applied after the final norm
    weight: float  # its weight in pruning: the token's probability, or given


TargetSpec = Union[int, str, tuple, LogitTarget]


def salient_logits(logits: Tensor, max_n_logits: int, desired_logit_prob: float) -> tuple[Tensor, Tensor]:
    """Token ids and probabilities of the smallest top set reaching ``desired_logit_prob``."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_idx = probs.topk(max_n_logits)
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor([desired_logit_prob]))) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def _token_id(spec: Union[int, str], tokenizer, vocab_size: int) -> int:
    if isinstance(spec, int):
        if not 0 <= spec < vocab_size:
            raise UsageError(f"target token id {spec} is outside the vocabulary [0, {vocab_size})")
        return spec
    if tokenizer is None:
        raise UsageError(f"target {spec!r} is text but the model has no tokenizer; pass a token id")
    ids = tokenizer.encode(spec, add_special_tokens=False)
    if len(ids) != 1:
        raise UsageError(f"target {spec!r} is {len(ids)} tokens ({ids}); a target must be one token "
                         "(mind the leading space, e.g. ' Paris')")
    return ids[0]


def resolve_targets(specs: Sequence[TargetSpec], *, logits: Tensor, direction, tokenizer,
                    decode) -> list[LogitTarget]:
    """Turn user target specs into LogitTargets.

    ``int`` or ``str``: a token (weight = its probability); ``(a, b)``: the logit difference
    a - b (weight 1 unless given as ``(a, b, weight)``); a ready :class:`LogitTarget` as is.
    ``direction(ids)`` gives demeaned unembedding rows; ``decode(id)`` a token's text."""
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    out: list[LogitTarget] = []
    n_custom = 0
    for spec in specs:
        if isinstance(spec, LogitTarget):
            out.append(spec)
            n_custom += spec.token_id >= vocab
        elif isinstance(spec, tuple):
            if len(spec) not in (2, 3):
                raise UsageError(f"a logit-difference target is (a, b) or (a, b, weight), got {spec!r}")
            a, b = (_token_id(s, tokenizer, vocab) for s in spec[:2])
            vec = direction(torch.tensor([a, b]))
            weight = float(spec[2]) if len(spec) == 3 else 1.0
            out.append(LogitTarget(f"{decode(a)!r} - {decode(b)!r}", vocab + n_custom, vec[0] - vec[1], weight))
            n_custom += 1
        else:
            t = _token_id(spec, tokenizer, vocab)
            out.append(LogitTarget(decode(t), t, direction(torch.tensor([t]))[0], float(probs[t])))
    if not out:
        raise UsageError("no targets given")
    return out


def default_targets(logits: Tensor, *, max_n_logits: int, desired_logit_prob: float, direction,
                    decode, targets: Optional[Sequence[TargetSpec]] = None, tokenizer=None) -> list[LogitTarget]:
    """Salient logits of ``logits [vocab]`` (the last position), or the given ``targets``."""
    if targets:
        return resolve_targets(targets, logits=logits, direction=direction, tokenizer=tokenizer, decode=decode)
    ids, probs = salient_logits(logits, max_n_logits, desired_logit_prob)
    vecs = direction(ids)
    return [LogitTarget(decode(int(t)), int(t), v, float(p)) for t, v, p in zip(ids, vecs, probs)]
