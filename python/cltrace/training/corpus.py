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


