"""``cltrace eval [SET] --corpus FILE``: how well a dictionary set (transcoders, CLT, SAEs,
crosscoder) reconstructs its site of a model on a text, and what splicing it in costs in
next-token loss, layer by layer."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ._common import add_model_arguments, messenger, read_text_file
from ..errors import UsageError

NAME = "eval"
HELP = ("evaluate a dictionary set (transcoders, SAEs, crosscoder) on a text corpus: FVU, L0, "
        "dead/dense features, loss when spliced in")
DESCRIPTION = """\
Evaluate a dictionary set on the first --tokens tokens of a text corpus cut into rows of
--ctx tokens, each starting with <bos>. SET is a folder or hub reference in the Gemma Scope 2
or circuit-tracer layout (default: the starter set, as `cltrace attribute`): transcoders
(per-layer, with or without affine skip, or cross-layer: they read the MLP input and
reconstruct the MLP output), SAEs (resid_post: the block output; attn_out: o_proj's input;
mlp_out: the MLP output after post_feedforward_layernorm: each reads and reconstructs its
site) or a crosscoder (resid_post of a few layers; a layer's reconstruction sums the features
read there and at its earlier layers). Per layer (docs/method.md, "Evaluating a dictionary"):

  FVU        fraction of variance of the site the reconstruction leaves unexplained
  L0         active features per token: mean, 10th/50th/90th percentile, max
  dead       features that never fire on the evaluated tokens
  dense      features firing on more than --dense-threshold of them
  CE splice  next-token cross-entropy (nats/token) with this layer's site replaced by the
             reconstruction (a CLT's: the features of every layer <= it), one layer at a time
  dCE        CE splice - the clean model's CE
  CE zero    the CE with this layer's site set to 0 (for resid_post: the whole residual
             stream after the block, the SAELens / Gemma Scope convention)
  recovered  (CE zero - CE splice) / (CE zero - clean CE): the fraction of loss recovered

<bos> positions enter no statistic and keep their activation. It prints one row per layer and
the mean; --json writes every number with the settings, --plot an SVG of FVU and loss
recovered, and L0, per layer. Each evaluated layer costs two extra forward passes.

Examples:
  cltrace eval --corpus notes.txt
  cltrace eval google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small \\
      --corpus notes.txt --layers 0-5 --json eval.json --plot eval.svg
  cltrace eval google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small \\
      --corpus notes.txt
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation import EvalSettings
    from ..settings import add_options

    p.add_argument("transcoders", metavar="SET", nargs="?", default=None,
                   help="dictionary folder or hub reference: transcoders, SAEs or a crosscoder "
                   "(default: the trained starter set)")
    p.add_argument("--corpus", required=True, metavar="FILE",
                   help="UTF-8 text file; documents separated by two blank lines")
    add_model_arguments(p)
    add_options(p, EvalSettings)
    p.add_argument("--json", default=None, metavar="PATH", help="write every number as JSON here")
    p.add_argument("--plot", default=None, metavar="PATH.svg",
                   help="write an SVG of FVU, loss recovered and L0 per layer here")
    p.add_argument("--quiet", action="store_true", help="no progress messages or bars")
    p.error = _one_line_error  # a bad option is one line, as every other bad input


def _one_line_error(message: str):
    print(f"cltrace eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_corpus(path: str) -> list[str]:
    """The documents of a UTF-8 text file (split at two blank lines), checked: a readable,
    non-empty text file."""
    from ..training.corpus import split_documents

    docs = split_documents(read_text_file(Path(path), "--corpus"))
    if not docs:
        raise UsageError(f"--corpus {path}: the file is empty")
    return docs


def check_output_file(path: str | None, flag: str, suffix: str | None = None) -> Path | None:
    """Before any work: ``path``'s folder exists and can be written to (nothing is created)."""
    if path is None:
        return None
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise UsageError(f"{flag} {p}: expected a {suffix} file name")
    if p.is_dir():
        raise UsageError(f"{flag} {p}: a folder; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: cannot write to the folder {parent}")
    return p


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from ..evaluation import EvalSettings, evaluate_set, evaluated_layers
    from ..evaluation.plot import write_svg
    from ..models import load_model
    from ..settings import from_args

    settings = from_args(EvalSettings, args).check()
    docs = read_corpus(args.corpus)
    json_path = check_output_file(args.json, "--json")
    plot_path = check_output_file(args.plot, "--plot", ".svg")
    if json_path is not None and plot_path is not None and json_path.resolve() == plot_path.resolve():
        raise UsageError("--json and --plot name the same file")
    say = messenger(args.quiet)

    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise UsageError(f"model {args.model} has no tokenizer; eval reads text")
    if args.transcoders is None:
        from ..training.starter import starter_transcoders

        ts = starter_transcoders(loaded, progress=say, bar=not args.quiet)
    else:
        from ..transcoders import load_transcoders

        say(f"loading dictionaries {args.transcoders} ...")
        ts = load_transcoders(args.transcoders, model_config=loaded.model)
    from ..transcoders.checks import check_fits

    set_name = str(ts.info.get("set_id", "") or ts.source or args.transcoders or "starter")
    check_fits(ts, loaded.model, set_name)
    layers = evaluated_layers(ts, settings.layers)

    from ..training.corpus import token_rows

    rows = token_rows(loaded.tokenizer, docs, settings.ctx, max_tokens=settings.tokens)
    bos = loaded.tokenizer.bos_token_id
    have = min(int((rows[:, 1:] != bos).sum()), settings.tokens)
    say(f"evaluating {len(layers)} layer(s) on {have} tokens ({rows.shape[0]} rows of "
        f"{settings.ctx}): {1 + 2 * len(layers)} passes per batch of {settings.batch} rows ...")
    if have < settings.tokens:
        say(f"note: the corpus holds {have} tokens, fewer than --tokens {settings.tokens}")
    report = evaluate_set(loaded, ts, rows, settings, model_name=loaded.name, set_name=set_name,
                          bar=not args.quiet)
    print(report.summary())
    print(report.table())
    written = []
    if json_path is not None:
        data = report.to_json()
        data["corpus"] = str(args.corpus)
        data["set_source"] = args.transcoders or "starter"
        atomic_write_text(json_path, json.dumps(data, indent=1) + "\n")
        written.append(json_path)
    if plot_path is not None:
        write_svg(report, plot_path)
        written.append(plot_path)
    for p in written:
        print(f"wrote {p}")
    return 0
