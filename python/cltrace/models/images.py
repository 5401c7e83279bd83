"""Image files to the pixel values a Gemma 3 vision tower reads.

:func:`read_image` decodes a file to RGB ``[3, H, W]`` uint8: through Pillow when it is
installed (any format it reads), otherwise with the decoder here for PNG (8-bit gray, gray +
alpha, RGB, RGBA and palette; not interlaced) and binary PPM/PGM. A file that is none of these
is a :class:`~cltrace.errors.UsageError` naming it, raised before any model is loaded.

:class:`ImagePreprocessor` does what Gemma 3's image processor does without pan-and-scan, with
the numbers of the checkpoint's ``preprocessor_config.json``: convert to RGB, resize to
``size`` (bilinear, antialiased, on the 8-bit image: torch's uint8 kernel, which torchvision's
resize also runs on CPUs with AVX2), ``x * rescale_factor``, then
``(x - image_mean) / image_std`` per channel -> ``[3, S, S]`` float32.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UsageError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


def read_image(path: Union[str, Path]) -> Tensor:
    """The image in ``path`` as RGB ``[3, H, W]`` uint8 (alpha dropped, gray repeated)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the image ({e.strerror or e})") from None
    try:
        from PIL import Image  # noqa: F401  (optional: the decoders below otherwise)
    except ImportError:
        return _decode(data, path)
    return _decode_pil(path)


def _decode_pil(path: Path) -> Tensor:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"{path}: not an image Pillow can read ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode(data: bytes, path: Path) -> Tensor:
    try:
        if data.startswith(_PNG_MAGIC):
            return _to_rgb(_decode_png(data))
        if data[:2] in (b"P5", b"P6"):
            return _to_rgb(_decode_pnm(data))
    except (ValueError, IndexError, struct.error, zlib.error) as e:
        raise UsageError(f"{path}: a damaged or unsupported image ({e})") from None
    raise UsageError(f"{path}: not an image cltrace can read (PNG or binary PPM/PGM; other "
                     "formats such as JPEG need Pillow: pip install pillow)")


def _to_rgb(pixels: Tensor) -> Tensor:
    """``[H, W, C]`` uint8 with C in 1..4 -> ``[3, H, W]`` (gray repeated, alpha dropped)."""
    c = pixels.shape[2]
    rgb = pixels[..., :1].expand(-1, -1, 3) if c <= 2 else pixels[..., :3]
    return rgb.permute(2, 0, 1).contiguous()


def _decode_pnm(data: bytes) -> Tensor:
    """Binary PGM (P5) / PPM (P6), maxval <= 255."""
    fields, i = [], 2
    while len(fields) < 3:
        while data[i:i + 1].isspace():
            i += 1
        if data[i:i + 1] == b"#":
            i = data.index(b"\n", i)
            continue
        j = i
        while not data[j:j + 1].isspace():
            j += 1
        fields.append(int(data[i:j]))
        i = j
    w, h, maxval = fields
    if maxval > 255:
        raise ValueError("16-bit PNM is not supported")
    c = 3 if data[:2] == b"P6" else 1
    body = data[i + 1:i + 1 + w * h * c]
    if len(body) != w * h * c:
        raise ValueError("truncated pixel data")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(h, w, c)


def _decode_png(data: bytes) -> Tensor:
    """``[H, W, C]`` uint8 of an 8-bit, non-interlaced PNG (palette images expanded to RGB)."""
    import numpy as np

    pos, idat, palette, header = 8, [], None, None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or interlace or colour not in _PNG_CHANNELS:
        raise ValueError(f"PNG of bit depth {depth}, colour type {colour}, interlace {interlace} "
                         "(8-bit non-interlaced only)")
    c = _PNG_CHANNELS[colour]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    stride = w * c
    if raw.size != h * (stride + 1):
        raise ValueError("pixel data of the wrong size")
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f, line = int(rows[y, 0]), rows[y, 1:]
        if f == 0:
            cur = line
        elif f == 1:  # sub: a running sum per channel, modulo 256
            cur = np.cumsum(line.reshape(w, c), axis=0, dtype=np.uint8).reshape(stride)
        elif f == 2:  # up
            cur = line + prev  # uint8 arithmetic wraps modulo 256
        elif f in (3, 4):  # average, paeth: sequential along the row
            cur = np.frombuffer(_unfilter_row(f, line.tolist(), prev.tolist(), c), dtype=np.uint8)
        else:
            raise ValueError(f"unknown PNG filter {f}")
        out[y], prev = cur, cur
    pixels = out.reshape(h, w, c)
    if colour == 3:
        if palette is None:
            raise ValueError("palette image without PLTE")
        pixels = palette[pixels[..., 0]]
    return torch.from_numpy(np.ascontiguousarray(pixels))


def _unfilter_row(f: int, line: list, prev: list, c: int) -> bytes:
    """One row of PNG filter 3 (average) or 4 (Paeth), undone: ``c`` bytes per pixel."""
    cur = [0] * len(line)
    for x, v in enumerate(line):
        a = cur[x - c] if x >= c else 0
        b = prev[x]
        if f == 3:
            pred = (a + b) >> 1
        else:
            d = prev[x - c] if x >= c else 0
            p = a + b - d
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - d)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else d)
        cur[x] = (v + pred) & 255
    return bytes(cur)


class ImagePreprocessor:
    """Gemma 3's image preprocessing (module docstring) with one checkpoint's numbers."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 rescale: float = 1 / 255):
        self.size = size  # (height, width)
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # [3, 1, 1]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.rescale = rescale

    @classmethod
    def from_folder(cls, folder: Optional[Path], image_size: int) -> "ImagePreprocessor":
        """From ``folder/preprocessor_config.json`` when there is one, else Gemma 3's
        defaults (mean and std 0.5, the tower's ``image_size``)."""
        raw = {}
        if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
            raw = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        size = raw.get("size") or {}
        hw = (size.get("height", image_size), size.get("width", image_size))
        return cls(hw, raw.get("image_mean") or [0.5] * 3, raw.get("image_std") or [0.5] * 3,
                   raw.get("rescale_factor") or 1 / 255)

    def __call__(self, images: Sequence[Tensor]) -> Tensor:
        """RGB ``[3, H, W]`` uint8 images -> ``pixel_values [N, 3, S_h, S_w]`` float32."""
        out = []
        for im in images:
            x = im[None]  # [1, 3, H, W] uint8
            if tuple(x.shape[-2:]) != self.size:  # torch's 8-bit kernel: rounds as it resizes
                x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                                  antialias=True)
            out.append((x[0].float() * self.rescale - self.mean) / self.std)
        return torch.stack(out) if out else torch.zeros(0, 3, *self.size)
