"""Multimodal Gemma 3 (4B, 12B, 27B: ``Gemma3ForConditionalGeneration`` checkpoints) with images
in the prompt.

``load_multimodal(name_or_path)`` reads one safetensors checkpoint (a folder or a hub id, as
:func:`.load.load_model`) into

* the language model: cltrace's own :class:`~.gemma3.Gemma3ForCausalLM` (the fast path the
  replacement model and the frozen attribution work on), from ``model.language_model.*``
  (transformers 5) or ``language_model.model.*`` (hub checkpoints);
* the vision tower and projector: transformers' modules (:mod:`.vision`);
* the image preprocessing: the checkpoint's own image processor, loaded by transformers from
  its ``preprocessor_config.json`` (:mod:`.images`: cltrace's ``pixel_values`` are
  ``Gemma3Processor``'s exactly), image files read with Pillow; and its tokenizer.

A prompt marks where each image goes with Gemma 3's ``<start_of_image>``; as Gemma 3's
processor does, each one becomes ``"\\n\\n<start_of_image>" + n_soft x "<image_soft_token>" +
"<end_of_image>\\n\\n"`` before tokenizing (n_soft = ``mm_tokens_per_image``: 256). The
language model then reads the soft tokens at the soft-token positions and attends both ways
among one image's soft tokens (:meth:`LoadedMultimodal.logits`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import UsageError
from .images import ImagePreprocessor, read_image, require_pillow
from .vision import VisionInput

ImageLike = Union[str, os.PathLike, Tensor]  # a file, or RGB [3, H, W] uint8


class ImagePrompt(NamedTuple):
    """A tokenized prompt with its images."""

    input_ids: Tensor  # [1, T]: text tokens, <start_of_image>, soft tokens, <end_of_image>
    pixel_values: Tensor  # [N, 3, S, S]: the images, in prompt order
    image_groups: Tensor  # [1, T]: image index of each soft-token position, -1 elsewhere


class LoadedMultimodal(NamedTuple):
    """A multimodal Gemma 3: what :class:`.load.LoadedModel` holds (the language model,
    tokenizer, name), and its image input."""

    model: Any  # cltrace.models.gemma3.Gemma3ForCausalLM: the language model, eval mode
    tokenizer: Any  # the checkpoint's transformers tokenizer
    name: str
    vision: VisionInput  # vision tower + projector (transformers modules)
    preprocess: ImagePreprocessor

    def placeholder(self) -> str:
        """The token that marks an image in a prompt: ``<start_of_image>``."""
        return self.tokenizer.convert_ids_to_tokens(self.vision.tokens.begin)

    def prompt(self, text: str, images: Sequence[ImageLike], chat: bool = False) -> ImagePrompt:
        """Tokenize ``text`` with one ``<start_of_image>`` per image of ``images`` (files or
        RGB uint8 tensors ``[3, H, W]``), expanded as Gemma 3's processor does; ``chat``: as
        one user turn (:func:`.chat.chat_prompt`: Gemma 3's chat template writes an image of
        the turn as this same placeholder)."""
        from .chat import chat_prompt

        tk, ids = self.tokenizer, self.vision.tokens
        boi = self.placeholder()
        n = text.count(boi)
        if n != len(images):
            raise UsageError(f"the prompt has {n} {boi} placeholder(s) for {len(images)} "
                             f"image(s): put one {boi} where each image goes")
        pixels = self.pixel_values(images)
        soft, eoi = tk.convert_ids_to_tokens(ids.soft), tk.convert_ids_to_tokens(ids.end)
        if chat:
            text = chat_prompt(tk, text)  # holds <bos> already
        expanded = text.replace(boi, f"\n\n{boi}{soft * ids.per_image}{eoi}\n\n")
        input_ids = tk(expanded, add_special_tokens=not chat)["input_ids"]
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)[None]  # [1, T]
        found = int((input_ids == ids.soft).sum())
        if found != len(images) * ids.per_image:
            raise UsageError(f"the prompt tokenizes to {found} image soft tokens, expected "
                             f"{len(images) * ids.per_image} (does the text contain {soft}?)")
        return ImagePrompt(input_ids, pixels, self.vision.image_groups(input_ids))

    def prompt_from_ids(self, input_ids: Sequence[int], images: Sequence[ImageLike]) -> ImagePrompt:
        """The :class:`ImagePrompt` of already expanded token ids (a graph's prompt: its
        ``<image_soft_token>`` runs in place) and its ``images`` (files or RGB uint8 tensors), one
        per run of soft tokens, each run ``mm_tokens_per_image`` long."""
        ids = torch.as_tensor(list(input_ids), dtype=torch.long)[None]  # [1, T]
        groups = self.vision.image_groups(ids)
        runs = [int((groups == g).sum()) for g in range(int(groups.max()) + 1)]
        if len(runs) != len(images) or any(n != self.vision.tokens.per_image for n in runs):
            raise UsageError(f"the prompt has {len(runs)} run(s) of image soft tokens ({runs}) for "
                             f"{len(images)} image(s) of {self.vision.tokens.per_image} soft tokens")
        return ImagePrompt(ids, self.pixel_values(images), groups)

    def pixel_values(self, images: Sequence[ImageLike]) -> Tensor:
        """``[N, 3, S, S]``: the images (files or RGB uint8 tensors) as the vision tower reads them."""
        return self.preprocess([_rgb(im, i) if isinstance(im, Tensor) else read_image(im)
                                for i, im in enumerate(images)])

    def token_labels(self, prompt: ImagePrompt) -> list[str]:
        """One label per position: the token's text, and for a soft token its cell on the
        image's pooled grid, ``<img r,c>`` (row r, column c from 0), or ``<img i:r,c>`` (image
        i from 1) when the prompt has several images."""
        ids = prompt.input_ids[0].tolist()
        groups = prompt.image_groups[0].tolist()
        several = max(groups, default=-1) > 0
        labels, seen = [], {}  # seen[g]: soft tokens of image g so far
        for t, g in zip(ids, groups):
            if g < 0:
                labels.append(self.tokenizer.decode([t]))
                continue
            r, c = self.vision.patch_of(seen.get(g, 0))
            seen[g] = seen.get(g, 0) + 1
            labels.append(f"<img {g + 1}:{r},{c}>" if several else f"<img {r},{c}>")
        return labels

    def embed(self, prompt: ImagePrompt) -> Tensor:
        """The language model's input ``[1, T, d_model]`` (scaled token embeddings, unscaled
        soft tokens at the soft-token positions)."""
        dev = self.model.device
        return self.vision.embed(self.model, prompt.input_ids.to(dev), prompt.pixel_values.to(dev))

    @torch.no_grad()
    def logits(self, prompt: ImagePrompt, bidirectional: bool = True) -> Tensor:
        """``[1, T, vocab]`` on the prompt; ``bidirectional=False`` drops the image rule of
        the mask (plain causal attention: not the model's function, for comparisons)."""
        groups = prompt.image_groups.to(self.model.device) if bidirectional else None
        return self.model(inputs_embeds=self.embed(prompt), image_groups=groups).logits


def _rgb(image: Tensor, i: int) -> Tensor:
    """An image given as a tensor, checked: RGB ``[3, H, W]`` uint8."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise UsageError(f"image {i}: a tensor image must be RGB [3, H, W] uint8, got "
                         f"{image.dtype} of shape {tuple(image.shape)}")
    return image


def check_multimodal(name_or_path: Union[str, os.PathLike]) -> None:
    """UsageError (one line) unless ``name_or_path`` is a multimodal Gemma 3 checkpoint and
    Pillow (which reads the images) is installed; reads its ``config.json`` only (hub ids: that
    one file), so it runs before any model loads."""
    from .load import _EMBEDDED_NAMES, _hub_download, _HUB_ID

    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in _EMBEDDED_NAMES and not path.exists():
        raise UsageError(f"model {name} is text-only: images need a multimodal Gemma 3 "
                         "checkpoint (4B, 12B or 27B, e.g. google/gemma-3-4b-it)")
    if path.is_dir():
        config = path / "config.json"
    elif path.is_file():
        raise UsageError(f"model {name}: images need a safetensors checkpoint folder or hub id, "
                         "not a single file")
    elif _HUB_ID.match(name):
        config = _hub_download(name, config_only=True) / "config.json"
    else:
        raise UsageError(f"model {name!r} does not exist")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise UsageError(f"model {name}: cannot read its config.json ({e})") from None
    if model_type != "gemma3":
        raise UsageError(f"model {name} is a text-only checkpoint (model_type {model_type!r}): "
                         "images need a multimodal Gemma 3 (model_type 'gemma3': 4B, 12B, 27B)")
    require_pillow()


def load_multimodal(name_or_path: Union[str, os.PathLike], *,
                    device: Union[str, torch.device, None] = None,
                    dtype: Union[str, torch.dtype, None] = None,
                    progress: Optional[Callable[[str], None]] = None) -> LoadedMultimodal:
    """Load a multimodal Gemma 3 safetensors checkpoint (folder or hub id; see the module
    docstring). ``dtype`` defaults to float32 on CPU, bfloat16 on GPU, for both towers."""
    from .gemma3_load import load_gemma3, read_checkpoint
    from .load import _auto_tokenizer, _local_checkpoint, _print_progress, _resolve
    from .load import resolve_device, resolve_dtype
    from .vision import build_vision

    check_multimodal(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(name_or_path)
    folder, _ = _resolve(name, progress or _print_progress)
    local = _local_checkpoint(folder)
    if local is None:
        raise UsageError(f"model {name}: images need a safetensors checkpoint (model.safetensors)")
    where = str(folder)
    raw, tensors = read_checkpoint(local, where)
    model = load_gemma3(local, dt, name_or_path=where, where=where, checkpoint=(raw, tensors))
    vision = build_vision(raw, tensors, dt, where)
    preprocess = ImagePreprocessor.from_folder(local, vision.image_size)
    return LoadedMultimodal(model.to(dev).eval(), _auto_tokenizer(local), name,
                            vision.to(dev).eval(), preprocess)
