"""Training and evaluation text, all available offline, and the token rows cut from it.

Sources (each a list of documents, deterministic on a given machine):

* :func:`installed_docstrings` - the docstrings of every installed Python file (standard
  library and site-packages), read with :mod:`ast` (nothing is imported), files visited in a
  fixed hash order so that any prefix samples all packages, not the first few;
* :func:`package_descriptions` - the long descriptions (READMEs) in the metadata of every
  installed distribution (:mod:`importlib.metadata`), with code blocks, tables and markup
  lines removed: mostly English prose;
* :func:`language_reference` - the Python language and library reference topics shipped
  in :mod:`pydoc_data.topics` (technical English prose);
* :func:`generated_texts` - English text the model itself writes, sampled from short,
  general openings (news, stories, encyclopedia, letters, recipes ...);
* :func:`heldout_prose` - general English prose written for cltrace (encyclopedic and
  narrative paragraphs: geography, history, science, daily life) that no training source
  contains: the evaluation text "unlike the training text";
* :func:`stdlib_texts` (docstrings of named standard-library modules), :func:`file_texts`
  and :func:`dataset_texts` (a user's files or a Hugging Face dataset).

:func:`mixed_corpus` draws a stated mix of the first three by characters, interleaves the
documents in a fixed pseudo-random order and splits off every document whose hash falls in
the held-out bucket (training-like text never trained on). :func:`token_rows` cuts texts into
rows of ``ctx`` tokens, each starting with BOS (the activations themselves are read by
:class:`cltrace.models.activations.ActivationSource`).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import os
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from ..errors import UsageError

# Modules whose documentation `stdlib_texts` reads by default (all ship with CPython).
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

# The starter's mix, as fractions of characters (the README states it).
STARTER_MIX = {"docstrings": 0.3, "descriptions": 0.4, "reference": 0.3}
# Characters of the mix to draw per training token wanted (the mix averages 4.1 characters
# a token with the Gemma 3 tokenizer; the 10 % surplus is never tokenized).
CHARS_PER_TOKEN = 4.5
HELDOUT_BUCKET = 20  # one document in 20 (by hash) is held out of the training text

_PROSE_FILE = Path(__file__).with_name("heldout_prose.txt")


def _h(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "replace")).digest()[:8], "little")


# --- sources ----------------------------------------------------------------------------

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
    """Docstrings of the named (imported) modules and their public classes, functions and
    methods, deduplicated, in a fixed order."""
    seen, out = set(), []
    with warnings.catch_warnings():  # some attributes (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
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


def python_files() -> list[Path]:
    """Every installed ``.py`` file (standard library and site-packages), each once, in a
    fixed order by the hash of its path relative to its root."""
    roots = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")}
    found: dict[str, Path] = {}
    for root in sorted(roots):
        for d, _dirs, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.realpath(os.path.join(d, f))
                    found.setdefault(p, Path(p))
    rel = {p: os.path.relpath(p, next((r for r in sorted(roots, key=len, reverse=True)
                                       if p.startswith(r + os.sep)), "/")) for p in found}
    return [found[p] for p in sorted(found, key=lambda p: (_h(rel[p]), rel[p]))]


def _file_docstrings(path: Path, min_chars: int) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def installed_docstrings(max_chars: Optional[int] = None, min_chars: int = 80) -> list[str]:
    """Docstrings of all installed Python files (see :func:`python_files`), deduplicated, up to
    ``max_chars`` characters; files are visited in hash order, so a prefix spans all packages."""
    seen, out, total = set(), [], 0
    for path in python_files():
        for doc in _file_docstrings(path, min_chars):
            if doc not in seen:
                seen.add(doc)
                out.append(doc)
                total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return out


_CODE_LINE = re.compile(r"^(\s{4,}|\t|>>>|\.\.\.|\$ |\||[-=~^*+#]{3,}\s*$|<|\.\. |:[a-z]+:|!\[|\[!)")


def _prose_of(markdown: str) -> str:
    """The prose of a README: fenced/indented code, tables, directives, HTML, badges removed."""
    out, fence = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
            continue
        if fence or _CODE_LINE.match(line):
            continue
        line = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", line).strip()  # links -> their text
        out.append(line.lstrip("#").strip())
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", "\n".join(out))]
    keep = [p for p in paras if len(p) >= 60 and sum(c.isalpha() or c == " " for c in p) > 0.8 * len(p)]
    return "\n\n".join(keep)


def package_descriptions(min_chars: int = 200) -> list[str]:
    """The prose of every installed distribution's long description, deduplicated, sorted by
    distribution name."""
    import importlib.metadata as md

    seen, out = set(), []
    dists = sorted(md.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower())
    for d in dists:
        raw = d.metadata.get_payload() or d.metadata.get("Description") or ""
        text = _prose_of(raw if isinstance(raw, str) else "")
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def language_reference() -> list[str]:
    """The Python language/library reference topics of :mod:`pydoc_data.topics`, sorted."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a Python built without pydoc_data
        return []
    return [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= 80]


# Openings the model continues for :func:`generated_texts`: general English of many kinds
# (stories, news, encyclopedia, letters, instructions, opinion, dialogue, science, places,
# people, history, daily life), no code.
OPENINGS = [
    "Once upon a time, in a small village,", "The history of the city begins", "Dear Sir or Madam,",
    "In today's news,", "The recipe is simple:", "Scientists have found that", "My favourite book",
    "The weather this week", "According to the report,", "When I was a child,", "The election",
    "The museum opened", "Chapter One.", "Yesterday afternoon, the", "The main reason people",
    "In the year 1900,", "The company announced", "Most doctors agree that", "The road to the",
    "It was late in the evening when", "The team played", "Here are some tips for", "The river",
    "Many animals", "The president said", "Our school", "The first time I saw", "In the north of",
    "The island is located", "She opened the letter and", "The war ended in", "Water boils at",
    "The village had no electricity until", "Dear Grandma,", "The train was late again, so",
    "The mountain range stretches", "He was born in a small town", "The new law requires",
    "Bees are important because", "The old house at the end of the street", "To plant tomatoes,",
    "The king had three sons.", "The capital of the country is", "Last summer we travelled to",
    "The doctor told her that", "The farmers in the valley", "A healthy breakfast",
    "The city council voted", "The ship left the harbour", "Photosynthesis is the process",
    "The Roman Empire", "My neighbour has a dog that", "The market opens every morning",
    "In the middle of the desert,", "The children ran to the beach", "The moon orbits",
    "The bakery on the corner", "During the winter months,", "The judge listened carefully",
    "The ancient temple was built", "Thank you for your message.", "The storm hit the coast",
    "The population of the region", "Learning a new language", "The painter spent years",
    "The football match was", "Our family always celebrates", "The forest is home to",
    "The engine would not start, so", "The university was founded", "The volcano erupted",
    "When the guests arrived,", "The price of bread", "The library is quiet except",
    "The soldiers marched", "The human heart", "The festival takes place every year",
    "He looked out of the window and", "The bridge was closed because", "Coffee was first grown",
    "The queen visited", "After dinner, we", "The hospital needs more nurses", "The wolf",
    "The first settlers arrived", "Every morning at six,", "The scientist carefully measured",
    "The lake freezes in", "She had always wanted to", "The newspaper reported that",
    "The garden was full of", "The mayor promised", "Electricity is produced", "The old fisherman",
]


@torch.no_grad()
def generated_texts(model, tokenizer, n_texts: int, new_tokens: int = 96, seed: int = 0,
                    batch: int = 64, temperature: float = 0.8, top_k: int = 50,
                    progress=None) -> list[str]:
    """``n_texts`` continuations of :data:`OPENINGS` (cycled) sampled from ``model`` (seeded,
    temperature ``temperature`` over the ``top_k`` most likely next tokens, ``new_tokens``
    each), opening included. Sampling from the top k costs a [B, k] draw per step where the
    whole vocabulary (262k for Gemma 3) cost a [B, vocab] one, and keeps the text on the
    plausible path. ``progress(n)`` is called after each batch with the texts written."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for b in range(0, n_texts, batch):
        prompts = [OPENINGS[i % len(OPENINGS)] for i in range(b, min(b + batch, n_texts))]
        ids = [tokenizer(p)["input_ids"] for p in prompts]
        n = max(map(len, ids))
        x = torch.tensor([[pad] * (n - len(i)) + list(i) for i in ids], device=device)
        mask = torch.tensor([[0] * (n - len(i)) + [1] * len(i) for i in ids], device=device)
        past = None
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        step_in, gen = x, []
        for _ in range(new_tokens):
            o = model(input_ids=step_in, attention_mask=mask, position_ids=pos, past_key_values=past,
                      use_cache=True, logits_to_keep=1)
            past = o.past_key_values
            top = o.logits[:, -1].float().cpu().topk(min(top_k, o.logits.shape[-1]), -1)
            probs = torch.softmax(top.values / temperature, -1)  # [B, k]
            pick = torch.multinomial(probs, 1, generator=g)  # [B, 1] index into the top k
            nxt = top.indices.gather(1, pick).to(device)  # [B, 1] token ids
            gen.append(nxt)
            step_in = nxt
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            pos = pos[:, -1:] + 1
        toks = torch.cat(gen, 1).cpu()
        for p, t in zip(prompts, toks):
            eos = (t == tokenizer.eos_token_id).nonzero()
            t = t[: int(eos[0])] if len(eos) else t
            out.append(p + tokenizer.decode(t, skip_special_tokens=True))
        if progress is not None:
            progress(len(out))
    return out


def heldout_prose() -> list[str]:
    """General English prose shipped with cltrace for evaluation only (never trained on)."""
    return [d.strip() for d in _PROSE_FILE.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def split_documents(text: str) -> list[str]:
    """The documents of a text: separated by 3+ newlines (two blank lines), stripped, none empty."""
    return [d.strip() for d in text.split("\n\n\n") if d.strip()]


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
            out += split_documents(f.read_text(encoding="utf-8", errors="replace"))
    return out


def dataset_texts(spec: str, max_docs: Optional[int] = None) -> list[str]:
    """Texts of a Hugging Face dataset ``name[:config][@split]`` (column ``text``); needs the
    optional ``datasets`` package (and the dataset in its cache when offline)."""
    try:
        import datasets
    except ImportError as e:
        raise UsageError("--dataset needs the 'datasets' package (pip install datasets)") from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    out = []
    for row in ds:
        if "text" not in row:
            raise UsageError(f"dataset {spec} has no 'text' column (columns: {sorted(row)})")
        out.append(row["text"])
        if max_docs and len(out) >= max_docs:
            break
    return out


# --- the mix ----------------------------------------------------------------------------

@dataclass
class Corpus:
    """Documents to train on and held-out documents of the same kinds (never trained on)."""

    train: list[str]
    heldout: list[str]
    mix: dict[str, int]  # source -> characters drawn (train + held out)
    name: str


def mixed_corpus(chars: int, mix: Optional[dict[str, float]] = None,
                 generated: Sequence[str] = ()) -> Corpus:
    """About ``chars`` characters drawn from the offline sources in the proportions ``mix``
    (default :data:`STARTER_MIX`; keys ``docstrings``, ``descriptions``, ``reference``), plus
    all of ``generated`` (e.g. :func:`generated_texts`), the documents of all sources
    interleaved in hash order; one in :data:`HELDOUT_BUCKET` (by hash) is held out. A source
    with fewer characters than asked gives all it has."""
    mix = dict(STARTER_MIX if mix is None else mix)
    unknown = set(mix) - {"docstrings", "descriptions", "reference"}
    if unknown:
        raise UsageError(f"unknown corpus sources {sorted(unknown)}")
    chars, docs, drawn = int(chars), [], {}
    for src, frac in mix.items():
        want = int(chars * frac)  # characters of this source
        if want <= 0:
            continue
        pool = (installed_docstrings(max_chars=want) if src == "docstrings"
                else package_descriptions() if src == "descriptions" else language_reference())
        got, n = [], 0
        for d in sorted(pool, key=_h) if src != "docstrings" else pool:
            if n >= want:
                break
            got.append(d)
            n += len(d)
        docs += got
        drawn[src] = n
    if generated:
        docs += list(generated)
        drawn["generated"] = sum(map(len, generated))
    docs = sorted(set(docs), key=_h)
    held = [d for d in docs if _h("heldout:" + d) % HELDOUT_BUCKET == 0]
    train = [d for d in docs if _h("heldout:" + d) % HELDOUT_BUCKET != 0]
    name = "offline mix (" + ", ".join(f"{k} {v / max(1, sum(drawn.values())):.0%}"
                                       for k, v in drawn.items()) + ")"
    return Corpus(train, held, drawn, name)


def token_rows(tokenizer, texts: Sequence[str], ctx: int, max_tokens: Optional[int] = None) -> Tensor:
    """Tokenize ``texts`` into one stream (BOS before each document) cut into rows of ``ctx``
    tokens, each starting with BOS: ``[n_rows, ctx]`` int64. Stops once ``max_tokens``
    non-BOS tokens are covered (no more rows than that needs); a last partial row is dropped."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UsageError("the tokenizer has no BOS token")
    stream, need = [], None if max_tokens is None else max_tokens * ctx // (ctx - 1) + ctx
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream += [bos] + list(ids)
        if need is not None and len(stream) >= need:
            break
    body = ctx - 1
    n = len(stream) // body
    if max_tokens is not None:
        n = min(n, -(-max_tokens // body))
    if n == 0:
        raise UsageError(f"the corpus is too short: {len(stream)} tokens, need at least {body}")
    rows = torch.tensor(stream[: n * body], dtype=torch.int64).view(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.int64), rows], 1)
