"""What the real model reads in a steering pass: a prompt's token ids or, for a prompt with
images, its input embeddings (the image soft tokens in place) and the image groups that make
one image's soft tokens attend both ways (:mod:`cltrace.models.multimodal`).

Generation and teacher-forced continuations append text tokens after the prompt
(:meth:`ModelInput.extend`): their embeddings are the model's own scaled token embeddings, and
they are not image positions, so the image rule of the mask is unchanged for them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..errors import UsageError
from ..models.multimodal import ImagePrompt


class ModelInput(NamedTuple):
    """One sequence as the language model reads it."""

    tokens: Tensor  # [n_pos] int64
    embeds: Optional[Tensor] = None  # [n_pos, d_model]: the input with soft tokens; None: text
    image_groups: Optional[Tensor] = None  # [n_pos]: image of each soft token, -1 text; None: text

    @property
    def n_pos(self) -> int:
        return self.tokens.numel()

    def extend(self, model, new: Tensor) -> "ModelInput":
        """This sequence followed by the text tokens ``new [k]``."""
        if new.numel() == 0:
            return self
        tokens = torch.cat([self.tokens, new.to(self.tokens)])
        if self.embeds is None:
            return ModelInput(tokens)
        x = model.get_input_embeddings()(new.to(self.tokens)[None])[0]  # [k, d_model], scaled
        groups = torch.cat([self.image_groups, self.image_groups.new_full((new.numel(),), -1)])
        return ModelInput(tokens, torch.cat([self.embeds, x.to(self.embeds.dtype)]), groups)

    def logits(self, model, keep: int = 0) -> Tensor:
        """The model's logits ``[n_pos, vocab]`` on this sequence (one pass, no cache); ``keep``
        > 0: of the last ``keep`` positions only ``[keep, vocab]`` (the unembedding of the
        others skipped: generation reads the last)."""
        if self.embeds is None:
            return model(input_ids=self.tokens[None], use_cache=False, logits_to_keep=keep).logits[0]
        return model(inputs_embeds=self.embeds[None], image_groups=self.image_groups[None],
                     use_cache=False, logits_to_keep=keep).logits[0]


def model_input(rm, prompt) -> ModelInput:
    """The :class:`ModelInput` of ``prompt`` for ``rm`` (a replacement model or an
    :class:`~cltrace.steering.sae.SaeSteering`): text or token ids (``rm.tokenize``'s rules),
    an :class:`~cltrace.models.multimodal.ImagePrompt` (``rm.images``, a multimodal model,
    computes the soft tokens), or a ModelInput as it is."""
    if isinstance(prompt, ModelInput):
        return prompt
    if not isinstance(prompt, ImagePrompt):
        return ModelInput(rm.tokenize(prompt))
    images = getattr(rm, "images", None)
    if images is None:
        raise UsageError("an image prompt needs a multimodal model (loaded with load_multimodal)")
    tokens = rm.tokenize(prompt.input_ids[0])
    with torch.no_grad():
        embeds = images.embed(prompt)[0]  # [n_pos, d_model]
    return ModelInput(tokens, embeds, prompt.image_groups[0].to(embeds.device))


def state_input(state) -> ModelInput:
    """The :class:`ModelInput` a :class:`~cltrace.replacement.ReplacementState` was run on."""
    if state.image_groups is None:
        return ModelInput(state.tokens)
    return ModelInput(state.tokens, state.capture.embed, state.image_groups)
