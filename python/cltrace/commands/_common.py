"""Pieces shared by the commands: progress messages, and loading the replacement model."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def messenger(quiet: bool) -> Callable[..., None]:
    """Print progress to stderr (nothing with --quiet)."""
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))


def load_replacement(args: argparse.Namespace, say: Callable[..., None]):
    """(LoadedModel, ReplacementModel) from --model, --transcoders (default: the starter set),
    --device and --dtype."""
    from ..models import load_model
    from ..replacement import ReplacementModel
    from ..starter import starter_transcoders

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
