"""Memory-mapped, validated reading of safetensors files.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps each tensor
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data).
:class:`SafetensorsFile` checks the header against the file size (so a truncated or corrupt
file fails here, naming the file and tensor) and hands out CPU tensors that *view a private
memory map of the file*: nothing is read until a page is touched, indexing a few decoder rows
reads only those pages, the kernel may drop the pages again under memory pressure, and
writing to a tensor never changes the file (copy-on-write).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple, Union

import numpy as np
import torch

from ..errors import UsageError
from torch import Tensor

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header size


class SafetensorsError(UsageError):
    """A safetensors file that cannot be read: truncated, corrupt, or missing a tensor."""


class TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """The tensors of one safetensors file, memory-mapped on first use."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        self.nbytes = self.path.stat().st_size
        self.infos, self.metadata = _read_header(self.path, self.nbytes)
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info(key).shape

    def tensor(self, key: str) -> Tensor:
        """The tensor ``key`` as a CPU view of the file's memory map (no data read yet)."""
        info = self._info(key)
        if info.end == info.begin:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="c", shape=(self.nbytes,))
        raw = torch.from_numpy(self._mmap[info.begin:info.end])  # [nbytes] uint8, file-backed
        return raw.view(info.dtype).view(info.shape)

    def _info(self, key: str) -> TensorInfo:
        if key not in self.infos:
            raise SafetensorsError(f"{self.path}: no tensor {key!r} (has {sorted(self.infos)})")
        return self.infos[key]

    def __repr__(self) -> str:
        return (f"SafetensorsFile({str(self.path)!r}, {len(self.infos)} tensors, "
                f"{self.nbytes} bytes)")


def _read_header(path: Path, nbytes: int) -> tuple[dict[str, TensorInfo], dict]:
    def bad(msg: str) -> SafetensorsError:
        return SafetensorsError(f"{path}: not a valid safetensors file: {msg}")

    if nbytes < 8:
        raise bad(f"only {nbytes} bytes (truncated?)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(_MAX_HEADER, nbytes - 8):
            raise bad(f"header of {header_len} bytes does not fit in the {nbytes}-byte file "
                      "(truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r}: malformed entry {entry!r}") from None
        want = math.prod(shape) * _itemsize(dtype)
        if begin < 0 or end - begin != want:
            raise bad(f"tensor {key!r}: {end - begin} bytes stored for shape {list(shape)} "
                      f"{entry['dtype']} ({want} bytes)")
        if data_start + end > nbytes:
            raise bad(f"tensor {key!r} ends at byte {data_start + end} but the file has only "
                      f"{nbytes} bytes (truncated download?)")
        infos[key] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    return infos, metadata


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_file_backed(t: Tensor, path: Union[str, os.PathLike]) -> bool:
    """Whether ``t``'s memory lies in a mapping of ``path`` (Linux: reads /proc/self/maps)."""
    target = os.path.realpath(path)
    ptr = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    return True
    return False
