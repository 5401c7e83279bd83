"""The local replacement model of a Gemma 3 model and a transcoder set, on one prompt at a time.

``ReplacementModel.run(prompt)`` does one forward pass of the real model (:mod:`cltrace.frozen.capture`),
encodes every layer's MLP input with the transcoders, reconstructs the MLP outputs and keeps
the error vectors (:mod:`.encoding`), and freezes attention patterns and norm denominators
into the linear model of :mod:`cltrace.frozen`. With the error nodes added back, that linear model
reproduces the real logits; its linearised backward gives the gradients from which the
attribution graph's edges are contracted. Method: Ameisen et al. (2025), "Circuit Tracing",
https://transformer-circuits.pub/2025/attribution-graphs/methods.html

Images (:meth:`ReplacementModel.from_multimodal`): the prompt is an
:class:`~cltrace.models.multimodal.ImagePrompt`; its embeddings (token embeddings, the image
soft tokens in place) are the model's input, the capture keeps the bidirectional mask among
one image's soft tokens, and features and error nodes at the soft-token positions are nodes
like any other (the frozen model is then not causal).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import UsageError
from ..frozen.capture import capture
from ..models.anatomy import TextParts, text_parts
from ..models import chat
from ..frozen.model import FrozenLinearModel
from .encoding import encode, reconstruct, skip_matrices
from ..transcoders.checks import check_fits, check_transcoders
from ..transcoders.base import TranscoderSet
from .state import ReplacementState


class ReplacementModel:
    """A Gemma 3 model with a transcoder set: ``run(prompt)`` builds the replacement state."""

    def __init__(self, model: nn.Module, transcoders: TranscoderSet, tokenizer=None,
                 dtype: Optional[torch.dtype] = None, skip_positions: Union[int, str] = "auto",
                 model_name: str = "", images=None):
        self.images = images  # a LoadedMultimodal whose .model is ``model``, or None (text only)
        self.parts: TextParts = text_parts(model)
        self.model_name = model_name or getattr(model.config, "name_or_path", "") or ""
        self.model = model
        self.tokenizer = tokenizer
        self.device = self.parts.lm_head.weight.device
        self.dtype = dtype or self.parts.lm_head.weight.dtype
        where = transcoders.source or transcoders.model_name or "transcoders"
        check_transcoders(transcoders, where, "replacement models")
        check_fits(transcoders, self.parts.config, where)
        self.transcoders = transcoders.to(device=self.device, dtype=self.dtype)
        if not (skip_positions == "auto" or (isinstance(skip_positions, int) and skip_positions >= 0)):
            raise UsageError(f"skip_positions must be 'auto' or an int >= 0, got {skip_positions!r}")
        self.skip_setting = skip_positions  # "auto" or a count: see skip_positions_for

    @classmethod
    def from_pretrained(cls, model: Union[str, nn.Module], transcoders: Union[str, TranscoderSet],
                        device=None, dtype: Optional[torch.dtype] = None, tokenizer=None,
                        skip_positions: Union[int, str] = "auto") -> "ReplacementModel":
        """Build from a transformers Gemma 3 model (or a name for ``cltrace.models.load_model``)
        and a TranscoderSet (or a reference for ``cltrace.transcoders.load_transcoders``)."""
        name = model if isinstance(model, str) else ""
        if isinstance(model, str):
            from ..models import load_model  # lazily: loading needs transformers and weights

            loaded = load_model(model, device=device, dtype=dtype)
            model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
        elif device is not None:
            model = model.to(device)
        if isinstance(transcoders, str):
            from ..transcoders import load_transcoders

            transcoders = load_transcoders(transcoders, device=device, dtype=dtype)
        model.eval()
        return cls(model, transcoders, tokenizer=tokenizer, dtype=dtype,
                   skip_positions=skip_positions, model_name=name)

    @classmethod
    def from_multimodal(cls, loaded, transcoders: TranscoderSet, dtype: Optional[torch.dtype] = None,
                        skip_positions: Union[int, str] = "auto") -> "ReplacementModel":
        """The replacement model of a multimodal Gemma 3's language model
        (:class:`~cltrace.models.multimodal.LoadedMultimodal`): :meth:`run` then also takes
        the image prompts of ``loaded.prompt``."""
        return cls(loaded.model, transcoders, tokenizer=loaded.tokenizer, dtype=dtype,
                   skip_positions=skip_positions, model_name=loaded.name, images=loaded)

    # --- prompt handling -------------------------------------------------------------------

    def tokenize(self, prompt: Union[str, Tensor, Sequence[int]]) -> Tensor:
        """Token ids [n_pos] of a string (tokenizer adds <bos>) or of given ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UsageError("a string prompt needs a tokenizer: pass tokenizer= or token ids")
            if not prompt:
                raise UsageError("the prompt is empty")
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        else:
            ids = torch.as_tensor(prompt).reshape(-1)
        if ids.numel() == 0:
            raise UsageError("the prompt has no tokens")
        limit = getattr(self.parts.config, "max_position_embeddings", None)
        if limit is not None and ids.numel() > limit:
            raise UsageError(f"the prompt has {ids.numel()} tokens; the model takes at most {limit}")
        vocab = self.parts.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise UsageError(f"token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
        return ids.long().to(self.device)

    def is_instruction_tuned(self) -> bool:
        """An ``-it`` model, by the model's or the transcoders' name."""
        names = (self.model_name, self.transcoders.model_name or "")
        return any(n.rstrip("/").endswith("-it") for n in names)

    def skip_positions_for(self, tokens: Tensor) -> int:
        """Leading positions of ``tokens`` without nodes (no features, no error node): the
        ``skip_positions`` given to the model, or with "auto" the rule of
        :func:`cltrace.models.chat.skip_positions`."""
        if self.skip_setting != "auto":
            return min(int(self.skip_setting), tokens.numel())
        start_of_turn = None
        if self.tokenizer is not None:
            start_of_turn = self.tokenizer.convert_tokens_to_ids("<start_of_turn>")
        return chat.skip_positions(tokens, start_of_turn, self.is_instruction_tuned())

    # --- the replacement state -------------------------------------------------------------

    @torch.no_grad()
    def run(self, prompt: Union[str, Tensor, Sequence[int], "ImagePrompt"],
            all_logits: bool = True) -> ReplacementState:
        """One forward pass: capture, encode, reconstruct, errors, frozen linear model.
        ``all_logits=False`` keeps the logits of the last position only ([1, vocab]: at 4096
        tokens all of them take 4 GB). An :class:`~cltrace.models.multimodal.ImagePrompt`
        (models built by :meth:`from_multimodal`) runs on its embeddings with its image groups."""
        from ..models.multimodal import ImagePrompt  # lazily: image decoding is not needed for text

        labels = groups = None
        if isinstance(prompt, ImagePrompt):
            if self.images is None:
                raise UsageError("an image prompt needs a multimodal model (ReplacementModel.from_multimodal)")
            tokens = self.tokenize(prompt.input_ids[0])
            groups = prompt.image_groups[0].to(self.device)  # [n_pos]
            embeds = self.images.embed(prompt)[0]  # [n_pos, d_model], soft tokens in place
            cap = capture(self.parts, tokens, all_logits=all_logits, inputs_embeds=embeds,
                          image_groups=groups)
            labels = self.images.token_labels(prompt)
        else:
            tokens = self.tokenize(prompt)
            cap = capture(self.parts, tokens, all_logits=all_logits)
        skip_positions = self.skip_positions_for(tokens)
        mlp_in = torch.stack([c.mlp_in for c in cap.layers])  # [n_layers, n_pos, d_model]
        mlp_out = torch.stack([c.mlp_out for c in cap.layers])
        acts = encode(self.transcoders, mlp_in, skip_positions)
        recon = reconstruct(self.transcoders, acts, mlp_in, mlp_out, skip_positions)
        errors = mlp_out.to(self.dtype) - recon.total
        errors[:, :skip_positions] = 0  # no error nodes there (exactly, not to rounding)
        if not bool(torch.isfinite(errors).all()):
            L = int((~torch.isfinite(errors)).flatten(1).any(1).nonzero()[0])
            raise UsageError(f"the model's MLP output or the transcoder reconstruction of layer {L} "
                             "is not finite (NaN or inf): check the model's weights and dtype")
        frozen = FrozenLinearModel(self.parts, cap, self.dtype,
                                   W_skip=skip_matrices(self.transcoders, self.parts.n_layers))
        return ReplacementState(tokens=tokens, logits=cap.logits, capture=cap, acts=acts,
                                recon=recon, errors=errors, skip_positions=skip_positions, frozen=frozen,
                                transcoders=self.transcoders, image_groups=groups, labels=labels)
