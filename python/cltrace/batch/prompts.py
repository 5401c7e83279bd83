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
  images       an image file or a list of them (with ``prompt``, not ``messages``; only where
               the reader allows images: ``read_prompts(..., images_allowed=True)``, as
               ``cltrace batch`` does): relative paths are resolved against the prompts file's
               folder; the prompt holds one ``<start_of_image>`` per image, or none to have
               the images first (:func:`cltrace.pipeline.image_prompt_text`). Each file is
               read and decoded when the prompts are read; a multimodal model traces the row.

``label`` and ``pair`` are carried in :class:`~cltrace.pipeline.PromptSpec`; tracing ignores them.
``images`` become ``PromptSpec.images``: absolute paths (what :func:`spec_to_row` writes back)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ..pipeline import IMAGE_PLACEHOLDER, PromptSpec, check_slug, image_prompt_text, slugify
from ..errors import UsageError

COLUMNS = ("prompt", "messages", "slug", "target", "target_diff", "chat", "label", "pair", "images")


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


def _images(obj: dict, where: str, prompt: str, base: Optional[Path],
            checked: Optional[set] = None) -> tuple[str, tuple]:
    """``images``: (the prompt with one ``<start_of_image>`` per image, the absolute file
    paths), each file read and decoded (a UsageError naming ``where`` and the file) unless
    already in ``checked`` (the files this read has decoded; the new ones are added)."""
    from ..models.images import read_image

    value = obj.get("images")
    if value is None:
        return prompt, ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(f, str) and f.strip() for f in items):
        raise UsageError(f"{where}: 'images' must be an image file or a list of image files")
    if not items:
        return prompt, ()
    if "messages" in obj:
        raise UsageError(f"{where}: 'images' go with 'prompt' (with <start_of_image> where each "
                         "image goes), not with 'messages'")
    files = []
    for f in items:
        path = Path(f).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        path = Path(os.path.abspath(path))  # absolute, symlinks kept (their name is the copy's suffix)
        if checked is None or str(path) not in checked:
            if path.is_dir():
                raise UsageError(f"{where}: images: {path}: a folder, not an image file")
            try:
                read_image(path)  # decoded now: a bad file fails here, not in a worker
            except UsageError as e:
                raise UsageError(f"{where}: images: {str(e).splitlines()[0]}") from None
            if checked is not None:
                checked.add(str(path))
        files.append(str(path))
    try:
        prompt = image_prompt_text(prompt, len(files))
    except UsageError:
        n = prompt.count(IMAGE_PLACEHOLDER)
        raise UsageError(f"{where}: the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) for "
                         f"{len(files)} image(s) ('images'): put one {IMAGE_PLACEHOLDER} where "
                         "each image goes, or none to have the images first") from None
    return prompt, tuple(files)


def read_prompts(path: str | Path, chat: bool = False, images_allowed: bool = False) -> list[PromptSpec]:
    """The prompts of ``path`` with unique slugs (explicit ones kept; the others from the text,
    ``-2``, ``-3`` ... on repeats). Text files: each non-blank line is a prompt. JSONL (a
    ``.jsonl``/``.ndjson`` name, or a first line starting with '{'): one object a line; an empty
    ``prompt`` is kept (and fails in the batch). ``chat``: the default of ``chat``.

    ``images_allowed``: rows may have an ``images`` column (checked and resolved against the
    file's folder, module docstring); without it such a row is a UsageError naming the line,
    for the commands that do not run image prompts."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OSError(f"PROMPTS {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"PROMPTS {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    jsonl = path.suffix in (".jsonl", ".ndjson") or (lines and lines[0][1].lstrip().startswith("{"))
    rows = []  # (PromptSpec fields: prompt, slug or None, targets, chat, messages, label, pair, images)
    base, checked = path.parent, set()  # checked: the image files decoded (once each)
    for n, line in lines:
        if not jsonl:
            rows.append((line, None, (), chat, (), None, None, ()))
            continue
        rows.append(_row(line, f"PROMPTS {path} line {n}", chat, base if images_allowed else None,
                         checked))
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
            images = rest[-1]
            base_slug = slugify(prompt.replace(IMAGE_PLACEHOLDER, " ") if images else prompt)
            slug, k = base_slug, 1
            while slug in taken:
                k += 1
                slug = f"{base_slug}-{k}"
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
    if spec.images:
        row["images"] = [str(f) for f in spec.images]  # absolute: read back from anywhere
    return row


def spec_from_row(obj: dict, where: str) -> PromptSpec:
    """The PromptSpec of one JSONL object with a ``slug`` (as :func:`spec_to_row` writes it),
    checked (its ``images`` too: relative ones against the working folder)."""
    prompt, slug, *rest = _fields(obj, where, False, Path.cwd())
    if slug is None:
        raise UsageError(f"{where}: no 'slug'")
    return PromptSpec(prompt, slug, *rest)


def _row(line: str, where: str, chat: bool, base: Optional[Path], checked: Optional[set] = None) -> tuple:
    """One JSONL line's PromptSpec fields (slug None when not given), checked."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e.msg})") from None
    return _fields(obj, where, chat, base, checked)


def _fields(obj, where: str, chat: bool, base: Optional[Path], checked: Optional[set] = None) -> tuple:
    """One JSONL object's PromptSpec fields (slug None when not given), checked; ``base``: the
    folder relative image paths are resolved against, None where images are not allowed;
    ``checked``: :func:`_images`'."""
    from ..models.conversation import check_messages, messages_title

    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object with a string 'prompt' or a 'messages' list")
    unknown = [k for k in obj if k not in COLUMNS]
    if unknown:
        raise UsageError(f"{where}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")
    if base is None and obj.get("images") not in (None, []):
        raise UsageError(f"{where}: this command does not take image prompts (column 'images'; "
                         "`cltrace batch` traces them)")
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
    targets = _targets(obj, where)
    prompt, images = _images(obj, where, prompt, base, checked) if base is not None else (prompt, ())
    return (prompt, slug, targets, bool(obj.get("chat", chat)), messages, label,
            None if pair is None else str(pair), images)
