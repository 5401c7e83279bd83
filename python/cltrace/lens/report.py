"""The lens's result: per set, per layer, per encoded position the top-k latents; its terminal
table and its JSON (``cltrace.lens/1``, the input of the viewer's lens page).

JSON layout::

    {"format": "cltrace.lens/1", "model", "text", "top_k", "include_bos",
     "tokens": [{"pos", "id", "token", "bos"}],
     "sets": [{"set", "name", "what", "site", "d_sae", "layers", "pages"}],
     "cells": [{"set", "layer", "pos", "latents": [{"index", "act", "label"?, "page"?}]}]}

``cells`` holds one entry per (set, layer, encoded position), its latents by activation,
largest first (fewer than top_k when fewer are active). ``label`` and ``page`` (a path
relative to the JSON's folder) are there when feature pages were given.

A prompt with images (``cltrace lens --image``) adds, after ``cells``::

    "images": [{"file", "grid": [rows, cols], "positions": [first, last],
                "layers": [{"set", "layer", "top": [latent, ...],
                            "maps": [{"index", "patches": [k, ...], "acts": [a, ...]}]}]}]

``file``, ``grid`` and ``positions`` are those of a graph's ``metadata.info.images``
(:mod:`cltrace.export.images`: the image's copy beside the JSON, its soft-token grid, the
positions of its first and last soft token); the soft tokens are ``tokens`` named ``<img r,c>``
with cells like any token. Per (set, layer): ``top``, the top_k latents by their largest
activation on the image; ``maps``, each latent the lens shows at that layer with its
activation at every patch ``k = r * cols + c`` where it fires (elsewhere 0)
(:mod:`cltrace.lens.images`). Text lenses have no ``images`` key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from torch import Tensor

from .images import LensImage

LENS_FORMAT = "cltrace.lens/1"
TOP_PATCHES = 3  # patches listed per latent of an image in the terminal summary (--top-patches)
Labeler = Callable[[int, int, int], Optional[str]]  # (set number, layer, latent) -> text or None


@dataclass
class LensSet:
    """The lens of one dictionary set: ``latents[L] = (index [N, k], act [N, k], count [N])``
    over the report's encoded positions (``count``: how many of the k are active)."""

    name: str
    what: str  # e.g. "SAEs at resid_post", "transcoders"
    site: str  # the site its encoders read
    d_sae: int
    layers: list[int]
    latents: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class LensReport:
    """The top latents of each set at each token (:func:`cltrace.lens.feature_lens`)."""

    token_ids: list[int]
    tokens: list[str]
    bos: list[bool]  # per token: a <bos> (not encoded unless include_bos)
    positions: list[int]  # the encoded positions (rows of each latents tensor)
    sets: list[LensSet]
    top_k: int
    model: str = ""
    include_bos: bool = False
    text: str = ""
    images: list[LensImage] = field(default_factory=list)  # the prompt's images, in order

    def image_at(self, pos: int) -> int:
        """The image (index) whose soft token is at ``pos``, or -1."""
        for g, im in enumerate(self.images):
            if im.first <= pos < im.first + im.rows * im.cols:
                return g
        return -1

    def top(self, set_no: int, layer: int, pos: int) -> list[tuple[int, float]]:
        """[(latent, activation)] at ``pos`` (largest first); [] at a position not encoded."""
        if pos not in self.positions:
            return []
        r = self.positions.index(pos)
        idx, act, count = self.sets[set_no].latents[layer]
        n = int(count[r])
        return list(zip(idx[r, :n].tolist(), act[r, :n].tolist()))

    def cells(self) -> Iterator[tuple[int, int, int, list[tuple[int, float]]]]:
        """(set number, layer, position, top latents) of every encoded cell."""
        for s, ls in enumerate(self.sets):
            for L in ls.layers:
                idx, act, count = ls.latents[L]
                for r, pos in enumerate(self.positions):
                    n = int(count[r])
                    yield s, L, pos, list(zip(idx[r, :n].tolist(), act[r, :n].tolist()))

    def to_json(self, label: Optional[Labeler] = None, page: Optional[Labeler] = None,
                pages: Optional[list[Optional[str]]] = None,
                image_files: Optional[list[str]] = None) -> dict:
        """The JSON (module doc). ``label``/``page``: the label and feature page path of a
        latent, or None; ``pages``: per set, the folder of its pages (for the viewer);
        ``image_files``: the file name of each image's copy beside the JSON (default: the
        names the report holds)."""
        cells = []
        for s, L, pos, top in self.cells():
            lat = []
            for i, a in top:
                d = {"index": int(i), "act": round(float(a), 6)}
                text = label(s, L, i) if label else None
                if text:
                    d["label"] = text
                where = page(s, L, i) if page else None
                if where:
                    d["page"] = where
                lat.append(d)
            cells.append({"set": s, "layer": L, "pos": pos, "latents": lat})
        return {
            "format": LENS_FORMAT, "model": self.model, "text": self.text, "top_k": self.top_k,
            "include_bos": self.include_bos,
            "tokens": [{"pos": p, "id": int(i), "token": t, "bos": bool(b)}
                       for p, (i, t, b) in enumerate(zip(self.token_ids, self.tokens, self.bos))],
            "sets": [{"set": s, "name": ls.name, "what": ls.what, "site": ls.site,
                      "d_sae": ls.d_sae, "layers": ls.layers,
                      "pages": (pages[s] if pages else None)} for s, ls in enumerate(self.sets)],
            "cells": cells,
        } | ({"images": self._images_json(image_files)} if self.images else {})

    def _images_json(self, files: Optional[list[str]]) -> list[dict]:
        if files is not None and len(files) != len(self.images):
            raise ValueError(f"{len(files)} image file names for {len(self.images)} images")
        out = []
        for g, im in enumerate(self.images):
            layers = [{"set": s, "layer": L, "top": m.top,
                       "maps": [{"index": i, "patches": ps, "acts": [round(a, 6) for a in acts]}
                                for i, (ps, acts) in sorted(m.maps.items())]}
                      for (s, L), m in sorted(im.per_layer.items())]
            last = im.first + im.rows * im.cols - 1
            out.append({"file": files[g] if files is not None else im.file, "grid": [im.rows, im.cols],
                        "positions": [im.first, last], "layers": layers})
        return out

    def table(self, label: Optional[Labeler] = None, width: int = 40, patches: bool = False) -> str:
        """One line per (token, set, layer): position, token, set, layer and the top latents
        as ``index:activation`` (with ``label`` in brackets after each when given); a <bos> token is
        one line saying it is not encoded. An image's soft tokens are one line pointing to
        :meth:`image_table` unless ``patches`` (then one line per soft token, set and layer)."""
        multi = len(self.sets) > 1
        head = f"{'pos':>4}  {'token':<14} " + (f"{'set':<4}" if multi else "") + f"{'layer':>5}  top latents (index:activation)"
        lines = [head]
        for p, (t, b) in enumerate(zip(self.tokens, self.bos)):
            tok = _show(t)
            g = self.image_at(p) if self.images and not patches else -1
            if g >= 0:
                im = self.images[g]
                if p == im.first:
                    span = f"{im.first}-{im.first + im.rows * im.cols - 1}"
                    lines.append(f"{span:>4}  {'<image ' + str(g + 1) + '>':<14} {im.rows * im.cols} soft "
                                 f"tokens ({im.rows}x{im.cols} patches of {im.file}): see image {g + 1} below")
                continue
            if p not in self.positions:
                lines.append(f"{p:>4}  {tok:<14} " + ("<bos>: not encoded (--bos to include)" if b else "not encoded"))
                continue
            first = True
            for s, ls in enumerate(self.sets):
                for L in ls.layers:
                    items = []
                    for i, a in self.top(s, L, p):
                        text = label(s, L, i) if label else None
                        items.append(f"{i}:{a:.2f}" + (f" [{_cut(text, width)}]" if text else ""))
                    lines.append((f"{p:>4}  {tok:<14} " if first else " " * 21)
                                 + (f"{s:<4}" if multi else "") + f"{L:>5}  " + ("  ".join(items) or "-"))
                    first = False
        return "\n".join(lines)

    def image_table(self, label: Optional[Labeler] = None, patches: int = TOP_PATCHES, width: int = 40) -> str:
        """Per image, set and layer: its top latents by their largest activation on the image,
        each with the number of patches it fires on and its ``patches`` strongest patches as
        ``r,c:activation`` (row, column of the soft-token grid). "" without images."""
        multi = len(self.sets) > 1
        blocks = []
        for g, im in enumerate(self.images):
            n = im.rows * im.cols
            lines = [f"image {g + 1} ({im.file}): {im.rows}x{im.cols} soft tokens at positions "
                     f"{im.first}-{im.first + n - 1}; per layer its top {self.top_k} latents by their "
                     f"largest activation on the image, each with its {patches} strongest patches",
                     ("set " if multi else "") + f"{'layer':>5}  {'latent':>7}  {'fires on':>9}  "
                     "strongest patches (row,col:activation)"]
            for s, ls in enumerate(self.sets):
                for L in ls.layers:
                    m = im.per_layer.get((s, L))
                    if m is None or not m.top:
                        lines.append((f"{s:<4}" if multi else "") + f"{L:>5}  {'-':>7}  no latent fires on the image")
                        continue
                    for j, i in enumerate(m.top):
                        _best, _at, count = m.summary(i)
                        where = "  ".join(f"{r},{c}:{a:.2f}" for r, c, a in
                                          ((*im.cell(k), a) for k, a in m.top_patches(i, patches)))
                        text = label(s, L, i) if label else None
                        lines.append(((f"{s:<4}" if multi else "") + f"{L:>5}" if j == 0 else " " * (5 + 4 * multi))
                                     + f"  {i:>7}  {f'{count}/{n}':>9}  {where}"
                                     + (f"  [{_cut(text, width)}]" if text else ""))
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def summary(self) -> str:
        """One line: the model, tokens and what each set is."""
        sets = "; ".join(f"[{s}] {ls.name} ({ls.what}, {ls.d_sae} latents, layers "
                         f"{_layers(ls.layers)})" for s, ls in enumerate(self.sets))
        pics = (f" ({len(self.images)} image(s): "
                + ", ".join(f"{im.rows * im.cols} soft tokens" for im in self.images) + ")") if self.images else ""
        return (f"lens of {len(self.tokens)} tokens{pics}" + (f" on {self.model}" if self.model else "")
                + f", top {self.top_k} per layer: {sets}")


def _show(token: str) -> str:
    return _cut(repr(token)[1:-1], 14)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _layers(ls: list[int]) -> str:
    from ..settings import format_layers

    return format_layers(ls)
