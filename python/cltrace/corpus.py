"""Training text and the MLP activations a transcoder learns from.

Text comes from files the user names, a Hugging Face ``datasets`` dataset (optional import),
or by default the Python standard library's own documentation: the docstrings of many
standard-library modules, their classes, functions and methods, deduplicated (present on
every machine, no download).

Text is tokenized into one stream (each document starts with BOS) and cut into rows of
``ctx`` tokens, each row starting with BOS. :class:`ActivationSource` runs the model on a
batch of rows and records, per layer, the Gemma Scope 2 hook points: the MLP input
(``pre_feedforward_layernorm`` output) and output (``post_feedforward_layernorm`` output);
BOS positions are dropped (their activations are outliers that no transcoder should fit).
Reading is deterministic: rows are addressed by index, so a resumed run reads the same data.
"""
from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

# Modules whose documentation is the default corpus (all ship with CPython).
DOC_MODULES = [
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "builtins", "bz2",
    "calendar", "cmd", "codecs", "collections", "colorsys", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "ctypes", "dataclasses", "datetime", "decimal", "difflib",
    "dis", "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.server", "imaplib", "importlib", "inspect", "io", "ipaddress", "itertools", "json",
    "keyword", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "multiprocessing",
    "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb", "pickle", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "profile", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct",
    "subprocess", "sys", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
]


def _doc_objects(mod) -> Iterable[object]:
    yield mod
    for a in sorted(dir(mod)):
        if a.startswith("_"):
            continue
        obj = getattr(mod, a, None)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            yield obj
        if inspect.isclass(obj) and getattr(obj, "__module__", None) == mod.__name__:
            for m in sorted(vars(obj)):
                if not m.startswith("_"):
                    yield getattr(obj, m, None)


def stdlib_texts(modules: Sequence[str] = DOC_MODULES, min_chars: int = 80) -> list[str]:
    """Docstrings of standard-library modules and their public classes, functions and methods,
    deduplicated, in a fixed order (no download; what the running Python ships)."""
    seen, out = set(), []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # a module missing from this build of Python (e.g. no _ssl)
            continue
        for obj in _doc_objects(mod):
            try:
                doc = inspect.getdoc(obj)
            except Exception:
                continue
            if doc and len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                out.append(doc)
    return out


def file_texts(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Text of files (a folder contributes its ``*.txt`` and ``*.md`` files, sorted); documents
    are separated by blank lines of 3+ newlines or by file."""
    out = []
    for p in map(Path, paths):
        files = sorted([*p.rglob("*.txt"), *p.rglob("*.md")]) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise FileNotFoundError(f"corpus folder {p} has no .txt or .md files")
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"corpus file not found: {f}")
            text = f.read_text(encoding="utf-8", errors="replace")
            out += [d.strip() for d in text.split("\n\n\n") if d.strip()]
    return out


def dataset_texts(spec: str, max_docs: Optional[int] = None) -> list[str]:
    """Texts of a Hugging Face dataset ``name[:config][@split]`` (column ``text``); needs the
    optional ``datasets`` package (and the dataset in its cache when offline)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError("--dataset needs the 'datasets' package (pip install datasets)") from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    out = []
    for row in ds:
        if "text" not in row:
            raise ValueError(f"dataset {spec} has no 'text' column (columns: {sorted(row)})")
        out.append(row["text"])
        if max_docs and len(out) >= max_docs:
            break
    return out


def token_rows(tokenizer, texts: Sequence[str], ctx: int, max_tokens: Optional[int] = None) -> Tensor:
    """Tokenize ``texts`` into one stream (BOS before each document) cut into rows of ``ctx``
    tokens, each starting with BOS: ``[n_rows, ctx]`` int64. Stops once ``max_tokens``
    non-BOS tokens are covered; a last partial row is dropped."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token")
    stream, need = [], None if max_tokens is None else max_tokens * ctx // (ctx - 1) + ctx
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [bos] + list(ids)
        if need is not None and len(stream) >= need:
            break
    body = ctx - 1
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"the corpus is too short: {len(stream)} tokens, need at least {body}")
    rows = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), rows], 1)


@dataclass
class Activations:
    """MLP inputs and outputs of some layers on a batch of tokens (BOS positions dropped)."""

    x: Tensor  # [n_layers_kept, T, d_model]  pre_feedforward_layernorm output (transcoder input)
    y: Tensor  # [n_layers_kept, T, d_model]  post_feedforward_layernorm output (target)


class _Stop(Exception):
    pass


class ActivationSource:
    """MLP activations of ``model`` on token ``rows [n_rows, ctx]``, read by row index.

    ``read(idx)`` runs the rows ``idx [n]`` through the decoder stack only (no unembedding;
    it stops after the last layer needed)."""

    def __init__(self, model, rows: Tensor, layers: Sequence[int], bos_token_id: Optional[int],
                 batch_rows: int = 8, cache_dtype: Optional[torch.dtype] = None):
        from .capture import text_parts

        self.parts = text_parts(model)
        self.rows, self.layers, self.bos = rows, list(layers), bos_token_id
        self.batch_rows = batch_rows
        self.device = self.parts.lm_head.weight.device
        inner = getattr(model, "model", None)
        self.body = getattr(inner, "language_model", inner)  # the decoder stack
        # With cache_dtype, every row read is kept in memory in that dtype (and always served
        # from there, so a resumed run sees the same values): later epochs cost no model pass.
        self.cache_dtype = cache_dtype
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def tokens_per_row(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def cached_bytes(self) -> int:
        return sum(x.nbytes + y.nbytes for x, y in self._cache.values())

    @torch.no_grad()
    def read(self, idx: Tensor) -> Activations:
        """Activations of the rows ``idx [n]``: ``x, y [n_layers_kept, T, d_model]`` float32."""
        wanted = [int(i) for i in idx]
        store = self._cache if self.cache_dtype is not None else {}
        todo = list(dict.fromkeys(i for i in wanted if i not in store))
        for b in range(0, len(todo), self.batch_rows):
            chunk = todo[b:b + self.batch_rows]
            ids = self.rows[chunk]
            x, y = self._run(ids)  # [L, B, ctx, d] each
            keep = (ids != self.bos) if self.bos is not None else torch.ones_like(ids, dtype=torch.bool)
            dt = self.cache_dtype or torch.float32
            for r, i in enumerate(chunk):
                k = keep[r].to(x.device)
                store[i] = (x[:, r, k].to("cpu", dt), y[:, r, k].to("cpu", dt))
        xs = [store[i][0] for i in wanted]
        ys = [store[i][1] for i in wanted]
        return Activations(torch.cat(xs, 1).float(), torch.cat(ys, 1).float())

    def _run(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        rec: dict[tuple[str, int], Tensor] = {}
        last = max(self.layers)
        handles = []

        def hook(kind: str, L: int):
            def fn(_mod, _args, out):
                rec[(kind, L)] = (out[0] if isinstance(out, tuple) else out).detach()
                if kind == "y" and L == last:
                    raise _Stop
            return fn

        try:
            for L in self.layers:
                layer = self.parts.layers[L]
                handles.append(layer.pre_feedforward_layernorm.register_forward_hook(hook("x", L)))
                handles.append(layer.post_feedforward_layernorm.register_forward_hook(hook("y", L)))
            try:
                self.body(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        return (torch.stack([rec[("x", L)] for L in self.layers]),
                torch.stack([rec[("y", L)] for L in self.layers]))
