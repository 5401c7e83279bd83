"""The two sets of a contrast: two prompt files, or one JSONL whose ``label`` column names
each prompt's set. Checked before any tracing: unknown columns, labels, set sizes."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..pipeline import slugify
from .stats import min_attainable_p

COLUMNS = {"prompt", "slug", "target", "target_diff", "chat", "label", "messages", "pair"}


def read_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file's non-blank lines (a text file: ``{"prompt": line}``),
    each with its line number as ``_line``; an unknown column is a UsageError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OSError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    jsonl = path.suffix in (".jsonl", ".ndjson") or (lines and lines[0][1].lstrip().startswith("{"))
    rows = []
    for n, line in lines:
        if not jsonl:
            rows.append({"prompt": line, "_line": n})
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UsageError(f"{path} line {n}: expected a JSON object")
        unknown = sorted(set(obj) - COLUMNS)
        if unknown:
            raise UsageError(f"{path} line {n}: unknown column {unknown[0]!r} (known: "
                             f"{', '.join(sorted(COLUMNS))})")
        rows.append({**obj, "_line": n})
    return rows


def labels_of(path: str | Path, rows: list[dict]) -> tuple[list[str], list[int]]:
    """(the two label values, in order of first appearance; each row's set 0/1) of a one-file
    contrast; every row needs a string ``label`` and there must be exactly two values."""
    names: list[str] = []
    for r in rows:
        lab = r.get("label")
        if not isinstance(lab, str) or not lab:
            raise UsageError(f"{path} line {r['_line']}: no 'label' (a one-file contrast needs a "
                             f"string 'label' on every prompt)")
        if lab not in names:
            names.append(lab)
    if len(names) != 2:
        raise UsageError(f"{path}: 'label' must take exactly two values, found {len(names)}: "
                         f"{', '.join(map(repr, names[:5]))}")
    return names, [names.index(r["label"]) for r in rows]


def check_sizes(names: list[str], sizes: list[int], n_perm: int, alpha: float) -> None:
    """A UsageError naming the smaller set when the permutation test of these set sizes could
    not reach ``alpha`` (or a set has fewer than 2 prompts)."""
    small = min(range(2), key=lambda i: sizes[i])
    if min(sizes) < 2 or min_attainable_p(sizes[0], sizes[1], n_perm) > alpha:
        other = max(2, sizes[1 - small])
        need = next((k for k in range(2, 1000) if min_attainable_p(k, other, n_perm) <= alpha), 1000)
        raise UsageError(f"set {names[small]!r} has {sizes[small]} prompts: a permutation test "
                         f"against {sizes[1 - small]} prompts cannot reach p <= {alpha} (the smallest "
                         f"attainable is {min_attainable_p(max(sizes[0], 1), max(sizes[1], 1), n_perm):.3g}); "
                         f"give it at least {need}")


def set_prefix(name: str) -> str:
    """The prefix of a set's graph names: ``{prefix}-{slug}.json`` keeps two sets apart."""
    return slugify(name)[:24]
