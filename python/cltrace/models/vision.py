"""The image half of a multimodal Gemma 3 (``Gemma3ForConditionalGeneration``): images to soft
tokens, soft tokens into the language model's input.

The vision tower (SigLIP) and the projector are transformers' own modules, loaded from the
checkpoint's safetensors (``model.vision_tower.*`` / ``model.multi_modal_projector.*`` in
transformers 5, ``vision_tower.[vision_model.]*`` / ``multi_modal_projector.*`` in hub
checkpoints); the language model stays cltrace's (:mod:`.gemma3`). What they compute, as
transformers' ``Gemma3Model`` does::

    patches  = vision_tower(pixel_values).last_hidden_state    # [N, (S/p)^2, d_vision]
    pooled   = avg_pool(patches on their (S/p)x(S/p) grid)      # [N, n_soft, d_vision], n_soft = k^2
    soft     = rms_norm(pooled) @ W_proj                        # [N, n_soft, d_model], NOT scaled
    x0[i]    = soft[j]  at the j-th <image_soft_token> position, embed(ids[i]) * sqrt(d) elsewhere

and the language model attends both ways among the soft tokens of one image
(``image_groups``: :func:`.gemma3_parts.attention_masks`). Soft token ``j`` of an image covers
the patch-grid cell (row ``j // k``, column ``j % k``) of the pooled ``k x k`` grid.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

# checkpoint prefix -> this module's prefix (the first match wins)
_PREFIXES = (("model.vision_tower.vision_model.", "vision_tower."),
             ("model.vision_tower.", "vision_tower."),
             ("vision_tower.vision_model.", "vision_tower."),
             ("vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "multi_modal_projector."),
             ("multi_modal_projector.", "multi_modal_projector."))


class ImageTokenIds(NamedTuple):
    """The image tokens of a Gemma 3 vocabulary and how many soft tokens an image becomes."""

    begin: int  # <start_of_image>: the placeholder in a prompt, kept before the soft tokens
    end: int  # <end_of_image>
    soft: int  # <image_soft_token>: one per soft token, replaced by the projected features
    per_image: int  # mm_tokens_per_image (256 in the released models)


def vision_weights(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint names -> ``vision_tower.*`` / ``multi_modal_projector.*``; others dropped."""
    out = {}
    for key, t in tensors.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                out[new + key[len(old):]] = t
                break
    return out


class VisionInput(nn.Module):
    """Vision tower and projector of a multimodal checkpoint: ``pixel_values`` to soft tokens
    (:meth:`soft_tokens`), and a prompt's input embeddings with them in place (:meth:`embed`)."""

    def __init__(self, vision_tower: nn.Module, multi_modal_projector: nn.Module,
                 tokens: ImageTokenIds, image_size: int):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.tokens = tokens
        self.image_size = image_size  # pixels per side the tower reads
        self.grid = int(round(tokens.per_image ** 0.5))  # soft tokens per side

    def soft_tokens(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values [N, 3, S, S]`` -> soft tokens ``[N, per_image, d_model]``."""
        dtype = self.multi_modal_projector.mm_input_projection_weight.dtype
        out = self.vision_tower(pixel_values=pixel_values.to(dtype), return_dict=True)
        return self.multi_modal_projector(out.last_hidden_state)

    def embed(self, text_model: nn.Module, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        """The language model's input ``[B, T, d_model]``: token embeddings (scaled by
        sqrt(d_model)) with the soft tokens of ``pixel_values [N, 3, S, S]`` (not scaled) at
        the ``<image_soft_token>`` positions of ``input_ids [B, T]``, images in prompt order."""
        embed = text_model.get_input_embeddings()
        soft_at = input_ids == self.tokens.soft  # [B, T]
        ids = input_ids.masked_fill(soft_at, 0) if self.tokens.soft >= embed.num_embeddings else input_ids
        x = embed(ids)  # [B, T, d_model]
        if pixel_values.shape[0] == 0 and not bool(soft_at.any()):
            return x  # no image
        soft = self.soft_tokens(pixel_values)  # [N, per_image, d_model]
        if int(soft_at.sum()) != soft.shape[0] * soft.shape[1]:
            raise ValueError(f"the prompt has {int(soft_at.sum())} image soft tokens but "
                             f"{soft.shape[0]} image(s) give {soft.shape[0] * soft.shape[1]}")
        return x.masked_scatter(soft_at[..., None], soft.to(x.dtype))

    def image_groups(self, input_ids: Tensor) -> Tensor:
        """``[B, T]``: the image (0, 1, ... per row) each soft-token position belongs to, -1 for
        the other positions; one image is one run of consecutive soft tokens."""
        is_soft = input_ids == self.tokens.soft
        starts = is_soft & ~torch.nn.functional.pad(is_soft, (1, 0))[:, :-1]
        groups = torch.cumsum(starts.long(), dim=1) - 1
        return torch.where(is_soft, groups, torch.full_like(groups, -1))

    def patch_of(self, j: int) -> tuple[int, int]:
        """(row, column) of soft token ``j`` of an image on its pooled grid."""
        return divmod(j, self.grid)


def build_vision(raw: dict, tensors: dict[str, Tensor], dtype: torch.dtype, where: str) -> VisionInput:
    """The vision tower and projector of the multimodal ``config.json`` dict ``raw`` with the
    checkpoint's ``tensors`` (strictly: every weight present, none left over)."""
    from transformers import Gemma3Config, SiglipVisionModel
    from transformers.initialization import no_init_weights
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = Gemma3Config.from_dict(raw)
    with no_init_weights():  # every weight comes from the checkpoint: skip the random init
        tower = SiglipVisionModel(cfg.vision_config)
        projector = Gemma3MultiModalProjector(cfg)
    tokens = ImageTokenIds(cfg.boi_token_id, cfg.eoi_token_id, cfg.image_token_id,
                           cfg.mm_tokens_per_image)
    vision = VisionInput(tower, projector, tokens, cfg.vision_config.image_size)
    weights = vision_weights(tensors)
    wanted = vision.state_dict()
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(set(weights) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"{where}: the checkpoint's vision tower does not fit its config "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for name, t in weights.items():
        if tuple(t.shape) != tuple(wanted[name].shape):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the config says "
                             f"{tuple(wanted[name].shape)}")
    vision.load_state_dict({k: t.to(dtype) for k, t in weights.items()}, strict=True, assign=True)
    return vision.to(dtype).eval()
