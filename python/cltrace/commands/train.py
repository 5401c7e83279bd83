"""``cltrace train``: train JumpReLU transcoders on a model's MLP activations over a text corpus,
or SAEs on the activation at one site (``--site``)."""
from __future__ import annotations

import argparse

from ._common import add_model_arguments, messenger
from ..errors import UsageError

NAME = "train"
HELP = "train JumpReLU transcoders (per-layer or cross-layer) or SAEs (Gemma Scope 2 layout)"
DESCRIPTION = """\
Stream the model's MLP inputs and outputs (the Gemma Scope 2 hook points
pre_feedforward_layernorm / post_feedforward_layernorm outputs) over a text corpus and
train JumpReLU transcoders with the Gemma Scope 2 recipe: straight-through estimator for the
thresholds, a quadratic penalty around the target L0, a penalty on features that fire too
often, optionally Matryoshka nested prefixes (--matryoshka 256,512,1024). An L0 controller
on the thresholds keeps the measured L0 on --l0 (--l0-control none: the penalty alone); with
--control-tokens K it holds the L0 of K corpus tokens that are never trained on, which is
what unseen text fires when the corpus is passed over more than once (the batches' own L0
falls below it as the encoder learns them). The compiled sparse kernels do the
encoder/decoder forward and backward.

--site resid_post|attn_out|mlp_out trains SAEs instead, with the same recipe: each layer's
SAE reads the activation at that site (model.layers.L.output, the heads' outputs before
o_proj, or the post_feedforward_layernorm output) and reconstructs it; the FVU is that of
the site. Written in the Gemma Scope 2 SAE layout (config.json names hf_hook_point_in), for
`cltrace steer --sae OUT`, `cltrace eval OUT`.

The result is written to --out in the Gemma Scope 2 layout (load transcoders with
--transcoders OUT).
Training checkpoints to OUT.checkpoint.pt every --checkpoint-every seconds and on Ctrl-C;
--resume continues an interrupted run exactly where it stopped.

Corpus: --corpus FILE_OR_FOLDER (text; folders give their .txt/.md files), --dataset NAME
(a Hugging Face dataset with a 'text' column; needs the 'datasets' package), or by default
an offline mix (on every machine, no download): docstrings of every installed Python file
30 %, installed packages' long descriptions 40 %, the Python language reference 30 % (by
characters); the default reports held-out FVU/L0 on held-out documents of the mix and on
English prose that is in no training source. A run shorter than 100 steps is reported as
too short to mean anything.

--finetune SET fine-tunes an existing set instead (transcoders, a CLT, or SAEs at
resid_post/attn_out/mlp_out; the shape comes from the set, so --kind/--site/--width/--l0/
--affine-skip/--matryoshka are not taken): per step the training loss above plus --kl-coeff x
KL(p_clean || p_spliced), the KL between the model's next-token distribution with and without
the dictionary's reconstruction spliced in at one layer, each layer of --layers in turn (the
splice whose loss recovered `cltrace eval` reports). The model stays frozen; the gradient flows
through the layers after the splice into the dictionary. Each layer's L0 is held at its
starting value. --lr defaults to 5e-6 here (a trained set is wrecked by the training
default). Rows of --ctx tokens, --batch-size tokens per step, --tokens in all. Written
to --out in the Gemma Scope 2 layout; judge it with `cltrace eval OUT` against `cltrace eval SET`.

Examples:
  cltrace train --kind plt --affine-skip --width 4096 --l0 32 --tokens 300000 --out tc/
  cltrace train --layers 0-5 --corpus notes/ --width 2048 --l0 16 --tokens 100000 --out tc2/
  cltrace train --site resid_post --layers 6 --width 2048 --l0 32 --tokens 100000 --out sae/
  cltrace train --out tc/ --resume ...same options...
  cltrace train --finetune sae/ --layers 6 --kl-coeff 1 --tokens 4000 --batch-size 126 --ctx 64 --out sae-ft/
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..settings import add_options
    from ..training import TrainConfig

    add_model_arguments(p, dtype_default="float32")
    add_options(p, TrainConfig)
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                   help="text files or folders (default: the offline mix)")
    p.add_argument("--dataset", default=None, metavar="NAME[:CONFIG][@SPLIT]",
                   help="a Hugging Face dataset with a 'text' column (needs 'datasets')")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--checkpoint-every", type=float, default=120, metavar="SECONDS",
                   help="seconds between checkpoints (default 120)")
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoint.pt")
    p.set_defaults(resume_hint="add --resume to the same command to continue")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--finetune", default=None, metavar="SET",
                   help="fine-tune this dictionary set end to end (KL term) instead of training one")
    p.add_argument("--kl-coeff", default="1.0", metavar="X",
                   help="with --finetune: weight of the KL term, a number >= 0 (default 1)")


def corpus_texts(args: argparse.Namespace, tokens: int):
    """(training texts, held-out texts by name or None, corpus name) of the arguments."""
    from ..training.corpus import (CHARS_PER_TOKEN, dataset_texts, file_texts, heldout_prose,
                                   mixed_corpus)

    if args.corpus and args.dataset:
        raise UsageError("give --corpus or --dataset, not both")
    if args.corpus:
        return file_texts(args.corpus), None, ", ".join(map(str, args.corpus))
    if args.dataset:
        return dataset_texts(args.dataset), None, f"dataset {args.dataset}"
    c = mixed_corpus(CHARS_PER_TOKEN * tokens)
    return c.train, {"held-out mix": c.heldout, "held-out prose": heldout_prose()}, c.name


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..settings import from_args
    from ..training import TrainConfig, train_transcoders

    say = messenger(args.quiet)
    if args.finetune is not None:
        return run_finetune(args, say)
    cfg = from_args(TrainConfig, args)
    cfg.check()
    texts, evals, name = corpus_texts(args, tokens=cfg.corpus_tokens or cfg.tokens)
    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise UsageError(f"model {args.model} has no tokenizer; training reads text")
    r = train_transcoders(loaded, cfg, texts, eval_texts=evals, out=args.out, corpus_name=name,
                          resume=args.resume,
                          checkpoint_every=args.checkpoint_every, log=say, bar=not args.quiet)
    info = r.transcoders.info
    held = "; ".join(f"{n} FVU {e['fvu_mean']:.3f}, L0 {e['l0_mean']:.1f}"
                     for n, e in info["evals"].items())
    short = "" if info["meaningful"] else " (TOO SHORT to mean anything: raise --tokens)"
    what = "layer(s)" if cfg.site is None else f"SAE layer(s) at {cfg.site}"
    print(f"trained {len(r.fvu)} {what} on {r.tokens} tokens in {r.train_seconds:.0f}s: "
          f"held-out FVU {info['fvu_mean']:.3f}, L0 {info['l0_mean']:.1f} ({held}){short}; "
          f"wrote {args.out}")
    return 0


# --lr of --finetune when not given: Adam's first steps move every weight by about lr, in the
# sign of its gradient; at the training default (2e-4) one step across the starter set's dense
# skip matrix raised layer 6's KL on the 270M from 0.13 to ~1.5 nats (measured; 5e-5 too)
FINETUNE_LR = 5e-6
SHAPE_OPTIONS = ("kind", "site", "width", "l0", "affine_skip", "matryoshka")  # from the set


def run_finetune(args: argparse.Namespace, say) -> int:
    """``--finetune SET``: every check before the model loads or any file is written."""
    import dataclasses
    import os

    from ..models import load_model
    from ..settings import from_args
    from ..training import TrainConfig
    from ..training.finetune import check_finetunable, check_kl_coeff, finetune_set
    from ..transcoders import load_transcoders

    kl = check_kl_coeff(args.kl_coeff)
    if args.resume:
        raise UsageError("--finetune does not resume (it has no checkpoints): run it again")
    cfg = from_args(TrainConfig, args)
    default = TrainConfig()
    if cfg.lr == default.lr:  # not given: the training default wrecks a trained set
        cfg = dataclasses.replace(cfg, lr=FINETUNE_LR)
    given = [k for k in SHAPE_OPTIONS if getattr(cfg, k) != getattr(default, k)]
    if given:
        raise UsageError(f"--finetune takes its shape from the set: drop "
                         f"{', '.join('--' + k.replace('_', '-') for k in given)}")
    if os.path.exists(args.out):
        raise UsageError(f"{args.out} already exists; choose a new --out folder or remove it")
    ts = load_transcoders(args.finetune)
    check_finetunable(ts, cfg.layers)
    texts, _evals, name = corpus_texts(args, tokens=cfg.tokens)
    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise UsageError(f"model {args.model} has no tokenizer; fine-tuning reads text")
    r = finetune_set(loaded, ts, dataclasses.replace(cfg, layers=None), texts, kl_coeff=kl,
                     layers=cfg.layers, out=args.out, corpus_name=name, log=say,
                     bar=not args.quiet)
    kl0, kl1 = (sum(o.kl.values()) for o in (r.first, r.last))
    print(f"fine-tuned {ts.what} layer(s) {sorted(r.first.kl)} on {r.tokens} tokens in "
          f"{r.seconds:.0f}s: KL {kl0:.4f} -> {kl1:.4f} (first -> last batch); wrote {args.out}; "
          f"compare `cltrace eval {args.out}` with `cltrace eval {args.finetune}`")
    return 0
