"""Image files to the pixel values a Gemma 3 vision tower reads, done by transformers' own code.

:func:`read_image` opens a file with Pillow (any format Pillow reads) and converts it to RGB as
Gemma 3's processor does (transformers' ``convert_to_rgb``: transparency composited onto
white, gray and palette expanded) -> ``[3, H, W]`` uint8. A file Pillow cannot read, or a
missing Pillow, is a one-line :class:`~cltrace.errors.UsageError`.

:class:`ImagePreprocessor` is the checkpoint's own image processor, loaded by transformers
from its ``preprocessor_config.json`` (``Gemma3ImageProcessorPil``: resize to ``size`` with
Pillow's bilinear filter, ``x * rescale_factor``, ``(x - image_mean) / image_std``), called
with the settings ``Gemma3Processor`` gives it (``do_convert_rgb=True``,
``do_pan_and_scan=False``), so cltrace's ``pixel_values`` are transformers' exactly. The PIL
backend is asked for by name: torchvision's backend (which transformers would pick where
torchvision is installed) rounds its resize differently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..errors import UsageError

_INSTALL = "reading images needs Pillow: pip install 'cltrace[models]'"
# what Gemma3Processor passes its image processor (the checkpoints' preprocessor_config.json
# leaves both null): RGB always, no pan-and-scan crops (one image = one block of soft tokens)
_CALL = {"do_convert_rgb": True, "do_pan_and_scan": False}


def require_pillow() -> None:
    """UsageError (one line) unless Pillow is installed."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError:
        raise UsageError(_INSTALL) from None


def read_image(path: Union[str, Path]) -> Tensor:
    """The image in ``path`` as RGB ``[3, H, W]`` uint8 (converted as Gemma 3's processor
    converts: alpha composited onto white)."""
    require_pillow()
    from PIL import Image, UnidentifiedImageError
    from transformers.image_transforms import convert_to_rgb

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            rgb = convert_to_rgb(im, return_numpy=True)  # [H, W, 3] uint8
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise UsageError(f"{path}: not an image Pillow can read ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()


class ImagePreprocessor:
    """A checkpoint's Gemma 3 image processor (transformers', PIL backend): RGB uint8 images
    -> ``pixel_values [N, 3, S_h, S_w]`` float32 (module docstring)."""

    def __init__(self, processor: Any):
        self.processor = processor  # transformers' Gemma3ImageProcessorPil
        size = processor.size
        self.size = (int(size["height"]), int(size["width"]))  # what every image becomes

    @classmethod
    def from_folder(cls, folder: Optional[Path], image_size: int) -> "ImagePreprocessor":
        """From ``folder/preprocessor_config.json`` (every released checkpoint has one), else
        Gemma 3's processor with the tower's ``image_size`` and its mean and std of 0.5.
        UsageError if the processor's output size is not ``image_size``."""
        require_pillow()
        from transformers import AutoImageProcessor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        config = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if config is not None and config.is_file():
            try:
                proc = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UsageError(f"{config}: transformers cannot load this image processor "
                                 f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        else:
            proc = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size},
                                           image_mean=[0.5] * 3, image_std=[0.5] * 3)
        pre = cls(proc)
        if pre.size != (image_size, image_size):
            raise UsageError(f"{config}: the processor makes {pre.size[0]}x{pre.size[1]} images, "
                             f"the vision tower reads {image_size}x{image_size}")
        return pre

    def __call__(self, images: Sequence[Tensor]) -> Tensor:
        """RGB ``[3, H, W]`` uint8 images -> ``pixel_values [N, 3, S_h, S_w]`` float32."""
        from PIL import Image

        if not images:
            return torch.zeros(0, 3, *self.size)
        pil = [Image.fromarray(im.permute(1, 2, 0).contiguous().numpy())
               for im in images]
        out = self.processor(images=pil, return_tensors="np", **_CALL)["pixel_values"]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
