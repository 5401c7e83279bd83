"""Pieces shared by the commands: progress messages, argument declarations (model, layers),
and loading the replacement model."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def messenger(quiet: bool) -> Callable[..., None]:
    """Print progress to stderr (nothing with --quiet)."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


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


def add_model_arguments(p: argparse.ArgumentParser, dtype_default: str | None = None) -> None:
    """--model, --device and --dtype: what :func:`cltrace.models.load_model` reads."""
    p.add_argument("--model", default="gemma-3-270m",
                   help="model: 'gemma-3-270m' (embedded, default), a hub id, a folder or a .gguf")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=dtype_default,
                   help="float32, bfloat16, float16 (default: "
                        f"{dtype_default or 'float32 on CPU'})")


def add_replacement_arguments(p: argparse.ArgumentParser) -> None:
    """--model, --transcoders, --device and --dtype: what :func:`load_replacement` reads."""
    add_model_arguments(p)
    p.add_argument("--transcoders", default=None, metavar="T",
                   help="transcoder folder or hub reference (default: the trained starter set)")


def load_replacement(args: argparse.Namespace, say: Callable[..., None]):
    """(LoadedModel, ReplacementModel) from --model, --transcoders (default: the starter set),
    --device and --dtype."""
    from ..models import load_model
    from ..replacement import ReplacementModel
    from ..training.starter import starter_transcoders

    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.transcoders is None:
        transcoders = starter_transcoders(loaded, progress=say)
    else:
        from ..transcoders import load_transcoders

        say(f"loading transcoders {args.transcoders} ...")
        transcoders = load_transcoders(args.transcoders)
    return loaded, ReplacementModel(loaded.model, transcoders, tokenizer=loaded.tokenizer,
                                    model_name=loaded.name)
