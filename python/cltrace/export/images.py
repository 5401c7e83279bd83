"""The images of an image + text graph, for its JSON: ``metadata.info.images`` (a cltrace
extension, docs/interop.md "Images") and the copies of the image files beside the graph.

One entry per image, in prompt order::

    {"file": "<slug>.image1.png",   the copy written beside the graph JSON (a bare file name)
     "grid": [rows, cols],          the grid of its soft tokens (the projector's pooled patches)
     "positions": [first, last]}    the prompt positions (ctx_idx) of its first and last soft
                                    token, inclusive: soft token k (row-major) is at first + k

The soft tokens themselves are ``prompt_tokens`` entries named ``<img r,c>`` (``<img i:r,c>``
with several images, i from 1): graph readers that know nothing of images still show them.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..atomic import atomic_path

_CELL = re.compile(r"^<img (?:\d+:)?(\d+),(\d+)>$")


def image_entries(image_groups: Tensor, token_strs: Sequence[str], files: Sequence[str]) -> list[dict]:
    """The ``metadata.info.images`` entries of a prompt: ``image_groups [n_pos]`` (image index of
    each soft token, -1 elsewhere), the positions' names (``<img r,c>`` cells give the grid)
    and the file name of each image's copy."""
    groups = torch.as_tensor(image_groups).reshape(-1).cpu()
    n_images = int(groups.max()) + 1 if groups.numel() else 0
    if n_images != len(files):
        raise ValueError(f"{n_images} image(s) in the prompt, {len(files)} file name(s)")
    out = []
    for g, name in enumerate(files):
        pos = torch.nonzero(groups == g).flatten().tolist()
        if not pos or pos != list(range(pos[0], pos[-1] + 1)):
            raise ValueError(f"image {g + 1}: its soft tokens are not one run of positions")
        cells = [_CELL.match(token_strs[p]) for p in pos]
        if not all(cells):
            raise ValueError(f"image {g + 1}: its positions are not named <img r,c>")
        rows = 1 + max(int(m.group(1)) for m in cells)
        cols = 1 + max(int(m.group(2)) for m in cells)
        if rows * cols != len(pos):
            raise ValueError(f"image {g + 1}: {len(pos)} soft tokens on a {rows}x{cols} grid")
        out.append({"file": name, "grid": [rows, cols], "positions": [pos[0], pos[-1]]})
    return out


def image_copy_name(slug: str, index: int, source: str | Path) -> str:
    """The file name of image ``index`` (from 0) of graph ``slug``: ``{slug}.image{index+1}``
    and the source's suffix (lower case)."""
    return f"{slug}.image{index + 1}{Path(source).suffix.lower()}"


def copy_images(sources: Sequence[str | Path], out_dir: str | Path, slug: str) -> list[Path]:
    """Copy each image file beside the graph (atomically: a reader sees no half-written image);
    returns the paths written, named by :func:`image_copy_name`."""
    written = []
    for i, src in enumerate(sources):
        path = Path(out_dir) / image_copy_name(slug, i, src)
        with atomic_path(path) as tmp:
            shutil.copyfile(src, tmp)
        written.append(path)
    return written
