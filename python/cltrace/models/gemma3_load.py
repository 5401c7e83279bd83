"""Building cltrace's :class:`~.gemma3.Gemma3ForCausalLM` from a checkpoint, without transformers
(the other way, :func:`.gemma3.save_gemma3`, lives beside the model: imports go one way, from
here to :mod:`.gemma3`).

The model is constructed on the meta device (no random init) and each parameter becomes the
checkpoint's tensor: safetensors files (``model.safetensors`` or the shards listed by
``model.safetensors.index.json``) are memory-mapped copy-on-write and their tensors are views of
the mapping, so a float32 checkpoint loaded in float32 on the CPU is not copied at all; another
dtype or device costs exactly one cast/copy per tensor. Multimodal ``gemma3`` checkpoints keep
their language model (``model.language_model.*`` in transformers 5, ``language_model.model.*``
in older hub checkpoints); their vision tower and projector are :mod:`.vision`'s.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .gemma3 import Gemma3ForCausalLM
from .gemma3_config import Gemma3TextConfig, config_from_dict, read_config

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_TEXT_PREFIXES = (("model.", "model."), ("lm_head.", "lm_head."))
_MULTIMODAL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                        ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def safetensors_files(folder: Path) -> Optional[list[Path]]:
    """The checkpoint's safetensors files, or None when it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of one safetensors file as a view of a private (copy-on-write) memory map."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not supported")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            t = torch.empty(shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize:  # misaligned: one copy
            t = torch.frombuffer(bytearray(mm[base + begin:base + end]), dtype=dtype)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + begin)
        out[name] = t.view(shape)
    return out


def text_weights(tensors: dict[str, Tensor], multimodal: bool) -> dict[str, Tensor]:
    """Checkpoint names -> this model's names (``model.*``, ``lm_head.*``); others dropped."""
    prefixes = _MULTIMODAL_PREFIXES if multimodal else _TEXT_PREFIXES
    out = {}
    for key, t in tensors.items():
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old):]] = t
                break
    return out


def read_checkpoint(folder: Union[str, Path], where: Optional[str] = None) -> tuple[dict, dict[str, Tensor]]:
    """(the ``config.json`` dict, every tensor of the safetensors checkpoint in ``folder``,
    memory-mapped)."""
    folder = Path(folder)
    where = where or str(folder)
    raw = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    files = safetensors_files(folder)
    if files is None:
        raise FileNotFoundError(f"{where}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return raw, tensors


def load_gemma3(folder: Union[str, Path], dtype: torch.dtype, *, name_or_path: str = "",
                where: Optional[str] = None,
                checkpoint: Optional[tuple[dict, dict[str, Tensor]]] = None) -> Gemma3ForCausalLM:
    """The Gemma 3 text model of the safetensors checkpoint in ``folder`` (CPU, eval mode);
    ``checkpoint``: what :func:`read_checkpoint` read from it already."""
    folder = Path(folder)
    where = where or str(folder)
    cfg = read_config(folder, where)
    raw, tensors = checkpoint or read_checkpoint(folder, where)
    return build(cfg, text_weights(tensors, raw.get("model_type") == "gemma3"), dtype,
                 name_or_path=name_or_path, where=where)


def from_transformers(hf_model: nn.Module, where: str, name_or_path: str = "") -> Gemma3ForCausalLM:
    """cltrace's model sharing the weights of a transformers ``Gemma3ForCausalLM`` (no copy);
    used where transformers did the reading (GGUF files, ``.bin`` checkpoints)."""
    cfg = config_from_dict(hf_model.config.to_dict(), where)
    weights = dict(hf_model.state_dict())
    dtype = hf_model.lm_head.weight.dtype
    return build(cfg, weights, dtype, name_or_path=name_or_path, where=where)


def build(cfg: Gemma3TextConfig, weights: dict[str, Tensor], dtype: torch.dtype, *,
          name_or_path: str, where: str) -> Gemma3ForCausalLM:
    """Construct on the meta device and assign ``weights`` (cast to ``dtype``), strictly."""
    cfg.name_or_path = name_or_path
    with torch.device("meta"):
        model = Gemma3ForCausalLM(cfg)
    wanted = dict(model.named_parameters())  # the tied lm_head.weight appears once
    if not cfg.tie_word_embeddings and "lm_head.weight" not in weights:
        raise ValueError(f"{where}: tie_word_embeddings is false but there is no lm_head.weight")
    missing = sorted(set(wanted) - set(weights))
    unexpected = sorted(set(weights) - set(wanted) - {"lm_head.weight"})
    if missing or unexpected:
        raise ValueError(f"{where}: the checkpoint does not fit a Gemma 3 text model "
                         f"(missing {_few(missing)}, unexpected {_few(unexpected)})")
    for name, p in wanted.items():
        t = weights[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, the config says "
                             f"{tuple(p.shape)}")
        _assign(model, name, nn.Parameter(t.to(dtype), requires_grad=True))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _assign(model: nn.Module, name: str, p: nn.Parameter) -> None:
    *path, leaf = name.split(".")
    mod = model
    for part in path:
        mod = getattr(mod, part)
    setattr(mod, leaf, p)


def _few(names: Iterable[str], n: int = 4) -> str:
    names = list(names)
    if not names:
        return "none"
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
