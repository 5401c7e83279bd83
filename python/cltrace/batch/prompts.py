"""The prompts of a batch (and of ``cltrace steer --prompts``): a text file (one prompt per
line) or JSONL, one object a line with these columns (any other is an error naming it):

  prompt       the prompt text; or
  messages     a conversation instead: [{"role": "system"|"user"|"model"|"assistant",
               "content": ...}, ...] (:mod:`cltrace.models.conversation`; a last model message
               is a prefill). Exactly one of prompt and messages.
  slug         the graph's name (default: from the prompt, or the conversation's last user turn)
  target       a token or a list of tokens to attribute
  target_diff  [A, B] or a list of such pairs: logit differences to attribute
  chat         true: wrap the prompt in Gemma's chat turn (ignored with messages)
  label        a string: the prompt's class (e.g. "harmful"), for commands comparing groups
  pair         a string or int: an id shared by the prompts of a matched pair

``label`` and ``pair`` are carried in :class:`~cltrace.pipeline.PromptSpec`; tracing ignores them."""
from __future__ import annotations

import json
from pathlib import Path

from ..pipeline import PromptSpec, check_slug, slugify
from ..errors import UsageError

COLUMNS = ("prompt", "messages", "slug", "target", "target_diff", "chat", "label", "pair")


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
    rows = []  # (PromptSpec fields: prompt, slug or None, targets, chat, messages, label, pair)
    for n, line in lines:
        if not jsonl:
            rows.append((line, None, (), chat, (), None, None))
            continue
        rows.append(_row(line, f"PROMPTS {path} line {n}", chat))
    if not rows:
        raise UsageError(f"PROMPTS {path}: no prompts in the file")
    taken = set()
    for n, row in zip([n for n, _ in lines], rows):
        slug = row[1]
        if slug is not None:
            if slug in taken:
                raise UsageError(f"PROMPTS {path} line {n}: slug {slug!r} used twice")
            taken.add(slug)
    specs = []
    for prompt, slug, *rest in rows:
        if slug is None:
            base = slugify(prompt)
            slug, k = base, 1
            while slug in taken:
                k += 1
                slug = f"{base}-{k}"
            taken.add(slug)
        specs.append(PromptSpec(prompt, slug, *rest))
    return specs


def spec_to_row(spec: PromptSpec) -> dict:
    """The JSONL object of ``spec`` (the columns above; the inverse of :func:`spec_from_row`)."""
    row: dict = ({"messages": [{"role": r, "content": c} for r, c in spec.messages]} if spec.messages
                 else {"prompt": spec.prompt})
    row["slug"] = spec.slug
    tokens = [t for t in spec.targets if isinstance(t, str)]
    diffs = [list(t) for t in spec.targets if not isinstance(t, str)]
    if tokens:
        row["target"] = tokens
    if diffs:
        row["target_diff"] = diffs
    row["chat"] = spec.chat
    for k in ("label", "pair"):
        if getattr(spec, k) is not None:
            row[k] = getattr(spec, k)
    return row


def spec_from_row(obj: dict, where: str) -> PromptSpec:
    """The PromptSpec of one JSONL object with a ``slug`` (as :func:`spec_to_row` writes it), checked."""
    prompt, slug, *rest = _fields(obj, where, False)
    if slug is None:
        raise UsageError(f"{where}: no 'slug'")
    return PromptSpec(prompt, slug, *rest)


def _row(line: str, where: str, chat: bool) -> tuple:
    """One JSONL line's PromptSpec fields (slug None when not given), checked."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e.msg})") from None
    return _fields(obj, where, chat)


def _fields(obj, where: str, chat: bool) -> tuple:
    """One JSONL object's PromptSpec fields (slug None when not given), checked."""
    from ..models.conversation import check_messages, messages_title

    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object with a string 'prompt' or a 'messages' list")
    unknown = [k for k in obj if k not in COLUMNS]
    if unknown:
        raise UsageError(f"{where}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    if "prompt" in obj and "messages" in obj:
        raise UsageError(f"{where}: give 'prompt' or 'messages', not both")
    if "prompt" not in obj and "messages" not in obj:
        raise UsageError(f"{where}: expected an object with a string 'prompt' or a 'messages' list")
    messages = ()
    if "messages" in obj:
        messages = check_messages(obj["messages"], f"{where}: messages")
        prompt = messages_title(messages)
    elif isinstance(obj["prompt"], str):
        prompt = obj["prompt"]
    else:
        raise UsageError(f"{where}: expected an object with a string 'prompt'")
    slug = obj.get("slug")
    if slug is not None:
        check_slug(slug if isinstance(slug, str) else "", f"{where}: slug")
    label, pair = obj.get("label"), obj.get("pair")
    if label is not None and not isinstance(label, str):
        raise UsageError(f"{where}: 'label' must be a string")
    if pair is not None and (isinstance(pair, bool) or not isinstance(pair, (str, int))):
        raise UsageError(f"{where}: 'pair' must be a string or an int")
    return (prompt, slug, _targets(obj, where), bool(obj.get("chat", chat)), messages, label,
            None if pair is None else str(pair))
