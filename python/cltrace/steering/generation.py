"""Steered text generation: the real model with feature interventions applied by hooks.

Each step runs the real Gemma 3 model on the whole sequence so far (no KV cache, batch 1;
after an image prompt, its input embeddings with the soft tokens, then the generated tokens:
:mod:`.inputs`) with the free-mode hooks of :mod:`.modes`: for every intervened feature, ``(new − old) ·
W_dec`` is added to the MLP outputs it decodes to (with an
:class:`~cltrace.steering.sae.SaeSteering` as ``rm``: to the activation at its SAEs' site,
see :mod:`.sae`). By default the interventions act on the
prompt's positions only (their positions are resolved against the prompt); with
``steer_generated=True`` they are resolved against the current sequence, so ``pos=None`` or an
open-ended slice also steers every generated token. ``temperature=0`` is greedy; otherwise
tokens are sampled (optionally from the ``top_k`` most likely) with a generator seeded by
``seed``, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from .inputs import model_input
from .interventions import Intervention, check_interventions
from .modes import steering_hooks
from ..errors import UsageError


@dataclass
class Generation:
    """A prompt and its continuation."""

    tokens: Tensor  # [n_prompt + n_new] int64  prompt then generated ids
    n_prompt: int
    text: str  # the generated continuation, decoded ("" without a tokenizer)
    interventions: list[Intervention] = field(default_factory=list)

    @property
    def new_tokens(self) -> Tensor:
        return self.tokens[self.n_prompt:]  # [n_new]


def _check(max_new_tokens: int, temperature: float, top_k: Optional[int]) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not (temperature >= 0 and temperature < float("inf")):
        raise UsageError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")


def next_token(logits: Tensor, temperature: float, top_k: Optional[int],
               gen: Optional[torch.Generator]) -> int:
    """Greedy (temperature 0) or sampled next token from ``logits [vocab]``."""
    if temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.numel():
        kth = scores.topk(top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(rm, prompt, interventions: Sequence[Intervention] = (), max_new_tokens: int = 20,
             temperature: float = 0.0, top_k: Optional[int] = None, seed: Optional[int] = None,
             steer_generated: bool = False, stop_at_eos: bool = True) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt`` (text, ids, or an
    :class:`~cltrace.models.multimodal.ImagePrompt`) under ``interventions`` (free mode);
    ``rm`` is a :class:`~cltrace.replacement.ReplacementModel` (transcoder features) or a
    :class:`~cltrace.steering.sae.SaeSteering` (SAE latents).

    Deterministic: greedy, or sampled with a generator seeded by ``seed`` (0 when None)."""
    _check(max_new_tokens, temperature, top_k)
    start = model_input(rm, prompt)  # token ids, or an image prompt's embeddings
    tokens = start.tokens
    n_prompt, skip_positions = tokens.numel(), rm.skip_positions_for(tokens)
    ivs = check_interventions(interventions, rm.transcoders, n_prompt, skip_positions)
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
    eos = _eos_ids(rm) if stop_at_eos else set()
    limit = getattr(rm.parts.config, "max_position_embeddings", None)
    seq = tokens
    hooks = getattr(rm, "steering_hooks", None)  # an SaeSteering steers at its SAEs' site
    hooks = hooks or (lambda *a, **kw: steering_hooks(rm, *a, **kw))
    with hooks(ivs, skip_positions, n_ref=None if steer_generated else n_prompt):
        for _ in range(max_new_tokens):
            if limit is not None and seq.numel() >= limit:
                break
            logits = start.extend(rm.model, seq[n_prompt:]).logits(rm.model, keep=1)[-1]  # [vocab]
            tok = next_token(logits, temperature, top_k, gen)
            seq = torch.cat([seq, seq.new_tensor([tok])])
            if tok in eos:
                break
    text = rm.tokenizer.decode(seq[n_prompt:].tolist()) if rm.tokenizer is not None else ""
    return Generation(seq, n_prompt, text, ivs)


def _eos_ids(rm) -> set[int]:
    ids = getattr(rm.parts.config, "eos_token_id", None)
    if ids is None and rm.tokenizer is not None:
        ids = rm.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}
