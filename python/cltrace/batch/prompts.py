"""The prompts of a batch: a text file (one prompt per line) or JSONL
(``prompt``, optional ``slug``, ``target``, ``target_diff``, ``chat``)."""
from __future__ import annotations

import json
from pathlib import Path

from ..pipeline import PromptSpec, check_slug, slugify
from ..errors import UsageError


def _targets(obj: dict, where: str) -> tuple:
    """``target``: a token or a list of tokens; ``target_diff``: [a, b] or a list of pairs."""
    out = []
    target = obj.get("target")
    if target is not None:
        items = [target] if isinstance(target, str) else target
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise UsageError(f"{where}: 'target' must be a string or a list of strings")
        out += items
    diff = obj.get("target_diff")
    if diff is not None:
        pairs = [diff] if diff and isinstance(diff[0], str) else diff
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in pairs):
            raise UsageError(f"{where}: 'target_diff' must be [A, B] or a list of [A, B] pairs")
        out += [tuple(p) for p in pairs]
    return tuple(out)


def read_prompts(path: str | Path, chat: bool = False) -> list[PromptSpec]:
    """The prompts of ``path`` with unique slugs (explicit ones kept; the others from the text,
    ``-2``, ``-3`` ... on repeats). Text files: each non-blank line is a prompt. JSONL (a
    ``.jsonl``/``.ndjson`` name, or a first line starting with '{'): one object a line; an empty
    ``prompt`` is kept (and fails in the batch). ``chat``: the default of ``chat``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OSError(f"PROMPTS {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"PROMPTS {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    jsonl = path.suffix in (".jsonl", ".ndjson") or (lines and lines[0][1].lstrip().startswith("{"))
    rows = []  # (prompt, slug or None, targets, chat)
    for n, line in lines:
        if not jsonl:
            rows.append((line, None, (), chat))
            continue
        where = f"PROMPTS {path} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UsageError(f"{where}: expected an object with a string 'prompt'")
        slug = obj.get("slug")
        if slug is not None:
            check_slug(slug if isinstance(slug, str) else "", f"{where}: slug")
        rows.append((obj["prompt"], slug, _targets(obj, where), bool(obj.get("chat", chat))))
    if not rows:
        raise UsageError(f"PROMPTS {path}: no prompts in the file")
    taken = set()
    for n, (_, slug, _, _) in zip([n for n, _ in lines], rows):
        if slug is not None:
            if slug in taken:
                raise UsageError(f"PROMPTS {path} line {n}: slug {slug!r} used twice")
            taken.add(slug)
    specs = []
    for prompt, slug, targets, is_chat in rows:
        if slug is None:
            base = slugify(prompt)
            slug, k = base, 1
            while slug in taken:
                k += 1
                slug = f"{base}-{k}"
            taken.add(slug)
        specs.append(PromptSpec(prompt, slug, targets, is_chat))
    return specs
