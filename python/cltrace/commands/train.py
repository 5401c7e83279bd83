"""``cltrace train``: train JumpReLU transcoders on a model's MLP activations over a text corpus."""
from __future__ import annotations

import argparse
import sys

NAME = "train"
HELP = "train per-layer or cross-layer JumpReLU transcoders (Gemma Scope 2 layout)"
DESCRIPTION = """\
Stream the model's MLP inputs and outputs (the Gemma Scope 2 hook points
pre_feedforward_layernorm / post_feedforward_layernorm outputs) over a text corpus and
train JumpReLU transcoders with the Gemma Scope 2 recipe: straight-through estimator for the
thresholds, a quadratic penalty around the target L0, a penalty on features that fire too
often. The compiled sparse kernels do the encoder/decoder forward and backward.

The result is written to --out in the Gemma Scope 2 layout (load it with --transcoders OUT).
Training checkpoints to OUT.checkpoint.pt every --checkpoint-every seconds and on Ctrl-C;
--resume continues an interrupted run exactly where it stopped.

Corpus: --corpus FILE_OR_FOLDER (text; folders give their .txt/.md files), --dataset NAME
(a Hugging Face dataset with a 'text' column; needs the 'datasets' package), or by default
the Python standard library's own docstrings (on every machine, no download).

Examples:
  cltrace train --kind plt --affine-skip --width 4096 --l0 32 --tokens 300000 --out tc/
  cltrace train --layers 0-5 --corpus notes/ --width 2048 --l0 16 --tokens 100000 --out tc2/
  cltrace train --out tc/ --resume ...same options...
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma-3-270m",
                   help="model: 'gemma-3-270m' (embedded, default), a hub id, a folder or a .gguf")
    p.add_argument("--kind", choices=("plt", "clt"), default="plt",
                   help="per-layer (plt, default) or cross-layer (clt) transcoders")
    p.add_argument("--affine-skip", action="store_true", help="learn an affine skip connection")
    p.add_argument("--width", type=int, default=4096, metavar="W", help="features per layer")
    p.add_argument("--l0", type=float, default=32, metavar="TARGET",
                   help="target active features per token (default 32)")
    p.add_argument("--tokens", type=int, default=200_000, metavar="N", help="training tokens")
    p.add_argument("--corpus-tokens", type=int, default=None, metavar="M",
                   help="distinct training tokens (default N); M < N makes several passes")
    p.add_argument("--cache-activations", action="store_true",
                   help="keep activations in memory (bf16) so later passes skip the model")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                   help="text files or folders (default: standard-library docstrings)")
    p.add_argument("--dataset", default=None, metavar="NAME[:CONFIG][@SPLIT]",
                   help="a Hugging Face dataset with a 'text' column (needs 'datasets')")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--layers", default=None, help="source layers, e.g. 0-5,9 (default: all)")
    p.add_argument("--batch-size", type=int, default=1024, metavar="B", help="tokens per step")
    p.add_argument("--lr", type=float, default=2e-4,
                   help="Adam learning rate of the matrices (default 2e-4; thresholds and biases "
                        "use 10x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l0-coef", type=float, default=1.0, help="weight of the L0 penalty")
    p.add_argument("--freq-coef", type=float, default=0.1,
                   help="weight of the penalty on features firing above --max-freq")
    p.add_argument("--max-freq", type=float, default=0.1, help="(default 0.1 of tokens)")
    p.add_argument("--bandwidth", type=float, default=0.1, help="STE width (normalised units)")
    p.add_argument("--buffer-tokens", type=int, default=8192,
                   help="activations read from the model at a time (default 8192)")
    p.add_argument("--ctx", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--checkpoint-every", type=float, default=120, metavar="SECONDS")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint.pt")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_layers(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise ValueError(f"--layers {text!r}: expected e.g. 0-5,9") from None
    return sorted(set(out))


def corpus_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    from ..training.corpus import dataset_texts, file_texts, stdlib_texts

    if args.corpus and args.dataset:
        raise ValueError("give --corpus or --dataset, not both")
    if args.corpus:
        return file_texts(args.corpus), ", ".join(map(str, args.corpus))
    if args.dataset:
        return dataset_texts(args.dataset), f"dataset {args.dataset}"
    return stdlib_texts(), "Python standard-library docstrings"


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..training import TrainConfig, train_transcoders

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    cfg = TrainConfig(kind=args.kind, affine_skip=args.affine_skip, width=args.width, l0=args.l0,
                      tokens=args.tokens, corpus_tokens=args.corpus_tokens,
                      cache_activations=args.cache_activations, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      layers=parse_layers(args.layers) if args.layers else None,
                      bandwidth=args.bandwidth, l0_coef=args.l0_coef, freq_coef=args.freq_coef,
                      max_freq=args.max_freq, buffer_tokens=args.buffer_tokens, ctx=args.ctx)
    cfg.check()
    texts, name = corpus_texts(args)
    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype="float32")
    if loaded.tokenizer is None:
        raise ValueError(f"model {args.model} has no tokenizer; training reads text")
    r = train_transcoders(loaded, cfg, texts, out=args.out, corpus_name=name, resume=args.resume,
                          checkpoint_every=args.checkpoint_every, log=say, bar=not args.quiet)
    info = r.transcoders.info
    print(f"trained {len(r.fvu)} layer(s) on {r.tokens} tokens in {r.train_seconds:.0f}s: "
          f"held-out FVU {info['fvu_mean']:.3f}, L0 {info['l0_mean']:.1f}; wrote {args.out}")
    return 0
