"""The lens over an image of the prompt: which latents fire on which of its patches.

An image's soft tokens (256 in the released models: a 16 x 16 grid of pooled patches) are
positions like any other for the lens, but 256 rows of latents are no read. Per image and per
(set, layer) :func:`image_maps` keeps, from the layer's sparse encode (every active latent,
not only each position's top k):

* ``top``: the ``top_k`` latents with the largest activation anywhere on the image, ranked by
  it (ties: the lower index first);
* ``maps``: the activation of each latent the lens shows at that layer (those of ``top`` and
  every latent in the top k of any position, text or image) at every patch of the image where
  it is active, ``(patch [n], act [n])`` with ``patch = r * cols + c`` (row-major, as the soft
  tokens come), ascending. A patch it is absent from has activation 0 (the latent does not
  fire there), so the viewer's heatmap of any latent it can select is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ImageMap:
    """The lens over one image at one (set, layer) (module doc)."""

    top: list[int]  # latents by their largest activation on the image, largest first
    maps: dict[int, tuple[list[int], list[float]]]  # latent -> (patches, activations)

    def summary(self, latent: int) -> tuple[float, int, int]:
        """(largest activation, its patch, number of patches where the latent fires)."""
        patches, acts = self.maps.get(latent, ([], []))
        if not acts:
            return 0.0, -1, 0
        j = max(range(len(acts)), key=lambda k: (acts[k], -patches[k]))
        return acts[j], patches[j], len(acts)

    def top_patches(self, latent: int, n: int) -> list[tuple[int, float]]:
        """The ``n`` patches where ``latent`` fires most, [(patch, activation)], largest first."""
        patches, acts = self.maps.get(latent, ([], []))
        order = sorted(range(len(acts)), key=lambda k: (-acts[k], patches[k]))[:n]
        return [(patches[k], acts[k]) for k in order]


@dataclass
class LensImage:
    """One image of the prompt: its soft tokens sit at ``first .. first + rows * cols - 1``;
    ``per_layer[(set, layer)]`` its :class:`ImageMap`; ``file``: the image's file name (the
    copy beside the lens JSON once written)."""

    file: str
    rows: int
    cols: int
    first: int
    per_layer: dict[tuple[int, int], ImageMap] = field(default_factory=dict)

    @property
    def positions(self) -> list[int]:
        return list(range(self.first, self.first + self.rows * self.cols))

    def cell(self, patch: int) -> tuple[int, int]:
        """(row, column) of soft token ``patch`` on the grid."""
        return divmod(int(patch), self.cols)


def image_maps(sp, rows: Tensor, image: LensImage, shown: Tensor, top_k: int) -> ImageMap:
    """The :class:`ImageMap` of ``image`` from the CSR encode ``sp`` of the positions ``rows
    [N]`` (row r of ``sp`` is position ``rows[r]``); ``shown``: the latents the lens lists at
    this layer (any position's top k), whose maps are kept besides those of the top latents."""
    dev = sp.acts.device
    pos = rows.to(dev)[sp.rows()]  # [nnz] position of each entry
    first, n = image.first, image.rows * image.cols
    on = (pos >= first) & (pos < first + n)
    feat, act, patch = sp.feat_idx[on], sp.acts[on].float(), pos[on] - first  # [m]
    if feat.numel() == 0:
        return ImageMap([], {})
    latents, inv = torch.unique(feat, return_inverse=True)  # [u], [m]
    best = torch.full((latents.numel(),), float("-inf"), device=dev).scatter_reduce(
        0, inv, act, reduce="amax")  # [u] largest activation of each latent on the image
    order = sorted(range(latents.numel()), key=lambda u: (-float(best[u]), int(latents[u])))
    top = [int(latents[u]) for u in order[:top_k]]
    keep = torch.isin(feat, torch.as_tensor(sorted(set(top) | set(shown.tolist())), device=dev,
                                            dtype=feat.dtype))
    maps: dict[int, tuple[list[int], list[float]]] = {}
    f, p, a = feat[keep].tolist(), patch[keep].tolist(), act[keep].tolist()
    for fi, pi, ai in sorted(zip(f, p, a)):  # by latent, then patch
        ps, acts = maps.setdefault(fi, ([], []))
        ps.append(pi)
        acts.append(ai)
    return ImageMap(top, maps)


def lens_images(image_groups: Tensor, labels: list[str], files: list[str]) -> list[LensImage]:
    """The images of a prompt, from ``image_groups [T]`` (image of each soft token, -1
    elsewhere), the positions' labels (``<img r,c>``: the grid) and a file name per image."""
    from ..export.images import image_entries

    return [LensImage(e["file"], e["grid"][0], e["grid"][1], e["positions"][0])
            for e in image_entries(image_groups, labels, files)]
