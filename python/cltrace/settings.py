"""Settings dataclasses: the one source of every default of a job and of its CLI options.

Each job (trace, prune, train, ...) has a frozen dataclass whose fields carry their default
and, in ``field(metadata=...)``, how the field appears on the command line. The commands
generate their options from it (:func:`add_options`) and build it back from the parsed
arguments (:func:`from_args`); the Python API takes its defaults from the same class and the
files a job writes record the instance that was used. So a default is typed once.

    @dataclass(frozen=True)
    class PruneSettings:
        node_threshold: float = option(0.8, "cumulative influence kept ...", metavar="X")

A field made with a plain default (no :func:`option`) is not a command-line option.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional, Sequence, TypeVar

S = TypeVar("S")
_KEY = "cltrace_option"


def option(default: Any, help: str, *, metavar: Optional[str] = None, flag: Optional[str] = None,
           type: Optional[Callable[[str], Any]] = None, choices: Optional[Sequence[Any]] = None,
           default_text: Optional[str] = None) -> Any:
    """A dataclass field that is also a command-line option ``--{name-with-dashes}`` (or
    ``flag``). ``help`` says what the field means; the default is appended to it (as
    ``default_text`` when given). ``type`` parses the option's text (default: the type of
    ``default``; a bool field is a switch that turns the default around)."""
    meta = {_KEY: dict(help=help, metavar=metavar, flag=flag, type=type, choices=choices,
                       default_text=default_text)}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def _options(cls) -> list[tuple[dataclasses.Field, dict]]:
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def flag_of(cls, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls`` (for messages that name it)."""
    for f, meta in _options(cls):
        if f.name == name:
            return meta["flag"] or "--" + name.replace("_", "-")
    raise KeyError(f"{cls.__name__} has no option {name!r}")


def add_options(parser: argparse.ArgumentParser, cls, exclude: Sequence[str] = ()) -> None:
    """Add one option per :func:`option` field of the dataclass ``cls`` (except ``exclude``),
    with the field's default and help."""
    for f, meta in _options(cls):
        if f.name in exclude:
            continue
        shown = meta["default_text"] or ("none" if f.default is None else f"{f.default}")
        kw: dict[str, Any] = dict(dest=f.name, default=f.default, help=f"{meta['help']} (default {shown})")
        if isinstance(f.default, bool) and meta["type"] is None:
            kw["action"] = "store_false" if f.default else "store_true"
            kw["help"] = meta["help"]
        else:
            kw["type"] = meta["type"] or type(f.default)
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
            if meta["choices"] is not None:
                kw["choices"] = meta["choices"]
        parser.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), **kw)


def from_args(cls: type[S], args: argparse.Namespace, **extra: Any) -> S:
    """An instance of ``cls`` from the parsed options of :func:`add_options` (fields that are
    not options, or were excluded, keep their default unless given in ``extra``)."""
    values = {f.name: getattr(args, f.name) for f, _ in _options(cls) if hasattr(args, f.name)}
    values.update(extra)
    return cls(**values)


def as_dict(settings: Any) -> dict[str, Any]:
    """The settings as plain JSON values (tuples as lists), as files record them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}


def parse_layers(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (an argparse ``type``: a bad list is a usage error)."""
    out: list[int] = []
    try:
        for part in filter(None, (s.strip() for s in text.split(","))):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad layer list {text!r}; use e.g. '0-5,9'") from None
    return sorted(set(out))


def format_layers(xs) -> str:
    """[0, 1, 2, 5] -> '0-2,5': the inverse of :func:`parse_layers` (for messages and tables)."""
    xs = sorted(set(xs))
    parts, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            parts.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(parts)


def parse_sizes(text: str) -> list[int]:
    """'256,512,1024' -> [256, 512, 1024]: a list of sizes, given one by one (an argparse
    ``type``; a range 'a-b' would mean every size between, never what is meant)."""
    try:
        return [int(part) for part in filter(None, (s.strip() for s in text.split(",")))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size list {text!r}; list the sizes, e.g. "
                                         "'256,512,1024'") from None
