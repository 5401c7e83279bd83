"""``cltrace features``: feature pages and automatic labels for a dictionary set (transcoders,
CLT, SAEs, crosscoder), offline."""
from __future__ import annotations

import argparse
import functools
import resource
import sys
import time
from pathlib import Path
from ..errors import UsageError

NAME = "features"
HELP = ("build feature pages (top examples, logits, histogram) and labels for a dictionary set "
        "(transcoders, SAEs, crosscoder)")
DESCRIPTION = """\
Stream a corpus through the model (one forward pass up to the last layer asked for, one
encode per layer per token of the activation the set reads: the MLP input for transcoders,
the SAE's site for SAEs at resid_post, attn_out or mlp_out, resid_post for a crosscoder),
keep per feature its top activating examples, a uniform sample
of its firings, its frequency, range and histogram, then recompute the kept contexts to cut
the windows around each example, and write --out:

  features/{c}.json                 one page per feature that fired, c = Cantor(layer, feature)
  features/index.json.gz, layer_{L}.bin   the hosted layout (records of length + zlib JSON)
  labels.json.gz                    the labels cltrace reads (`cltrace attribute --features`)

A page's top and bottom logits are its decoder direction pushed through the final norm and
the unembedding (for attn_out SAEs: through o_proj and post_attention_layernorm's gain first;
for a crosscoder: its last layer's row; docs/method.md). Interrupted runs resume (rerun the
same command); identical inputs give identical files.
With no --corpus/--dataset, the Python standard library's docstrings are the corpus.

--ray [ADDRESS] distributes the scan (pass 1, the dominant cost on a large corpus) over Ray
actors: contiguous row shards, each actor loading the model and transcoders once and holding
one full per-feature state of the set; the shards' states are merged here, exactly (the same
files as without --ray when --threads is that run's torch thread count). The windows, logits
and writing stay in this process, which loads the model too. An interrupted --ray run resumes
with --ray, scanning only the missing shards.

Examples:
  cltrace features --tokens 200000 --out pages/starter
  cltrace features --tokens 5000000 --ray auto --workers 8 --out pages/starter-5m
  cltrace features --transcoders google/gemma-scope-2-270m-pt/transcoder_all/width_16k_l0_small \\
      --corpus notes.txt --layers 0-5 --out pages/gs2-16k
  cltrace features --transcoders google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small \\
      --corpus notes.txt --out pages/gs2-resid9
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ._common import add_replacement_arguments
    from ..features.settings import FeatureSettings
    from ..settings import add_options, parse_layers

    add_replacement_arguments(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", nargs="+", metavar="FILE", help="text files or folders (*.txt, *.md)")
    src.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset name[:config][@split]")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="L",
                   help="layers, e.g. 0-5 or 0,3,7 (default: all of the set)")
    add_options(p, FeatureSettings)
    p.add_argument("--no-json", action="store_true", help="skip the per-feature JSON files (binary layout only)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new or empty)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="scan on a Ray cluster (ray.init(ADDRESS); a local one without ADDRESS); "
                        "windows, logits and files stay here. Needs pip install 'cltrace[ray]'")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: scan actors (default: one per GPU, else one per 4 CPUs)")
    p.add_argument("--threads", type=int, default=0, metavar="T",
                   help="with --ray: torch threads per actor (default: the CPUs split between "
                        "the actors); the files are bit-identical to a run without --ray when T "
                        "is that run's thread count")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load_for_scan(model: str, transcoders, device: str, dtype: str):
    """(model, transcoders) from the command's options, in a Ray actor (picklable). Without
    --transcoders the actors of a machine take turns (a file lock), so a starter set not cached
    on that machine yet is trained once."""
    import contextlib
    import fcntl

    from ..models import cache_root, load_config, load_model
    from ..training.starter import starter_transcoders
    from ..transcoders import load_transcoders

    with contextlib.ExitStack() as stack:
        if transcoders is None:
            lock_path = cache_root() / "starter" / ".features.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fcntl.flock(stack.enter_context(open(lock_path, "a")), fcntl.LOCK_EX)
        ts = None if transcoders is None else load_transcoders(transcoders, model_config=load_config(model))
        loaded = load_model(model, device=device, dtype=dtype)
        if ts is None:
            ts = starter_transcoders(loaded, progress=lambda *a: None, bar=False)
    return loaded.model, ts


def check_corpus(paths) -> None:
    """Each corpus path exists; each file is non-empty UTF-8 text (its first 64 KiB read)."""
    from ._common import text_problem

    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"corpus file not found: {p}")
        files = sorted([*p.rglob("*.txt"), *p.rglob("*.md")]) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"corpus folder {p} has no .txt or .md files")
        for f in files:
            with open(f, "rb") as fh:
                head = fh.read(1 << 16)
            problem = text_problem(head, whole=False)  # a character may be cut at the 64 KiB mark
            if problem:
                raise UsageError(f"corpus file {f}: {problem}")
            if not head.strip():
                raise UsageError(f"corpus file {f} is empty")


def check_out_early(out: Path) -> None:
    """Before any work: --out is absent, empty, or holds an interrupted run (whose inputs
    are compared once the corpus is tokenized)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    names = [p.name for p in out.iterdir()]
    if names and ".work" not in names:
        from ..features.build import check_out

        check_out(out, "")


def _check_layers(layers, ts, text) -> None:
    bad = [L for L in layers or [] if L not in ts.layers]
    if bad:
        raise UsageError(f"--layers: layers {bad} are not in the set ({ts.what}) "
                         f"{ts.source or ''} (it has layers {sorted(ts.layers)})")


def run(args: argparse.Namespace) -> int:
    from ._common import messenger
    from ..features import build_pages
    from ..features.scan import tokens_per_row
    from ..features.settings import FeatureSettings
    from ..settings import from_args
    from ..models import load_config, load_model
    from ..training.corpus import dataset_texts, file_texts, stdlib_texts, token_rows
    from ..training.starter import starter_transcoders
    from ..transcoders import load_transcoders

    say = messenger(args.quiet)
    settings = from_args(FeatureSettings, args).check()
    if (args.workers is not None or args.threads) and not args.ray:
        raise UsageError("--workers and --threads are for --ray (the scan's actors)")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.ray:
        from ..ray_pool import import_ray

        if args.workers is not None and args.workers < 1:
            raise UsageError(f"--workers {args.workers} with --ray: give at least 1 actor (or leave it out)")
        import_ray()  # Ray missing: the error now, before any work
    layers = args.layers
    if args.corpus:
        check_corpus(args.corpus)
    out = Path(args.out)
    check_out_early(out)
    t_start = time.perf_counter()

    ts = None
    if args.transcoders is not None:  # checked against the model's config, before its weights load
        say(f"loading dictionaries {args.transcoders} ...")
        ts = load_transcoders(args.transcoders, model_config=load_config(args.model))
        _check_layers(layers, ts, args.layers)
    say(f"loading model {args.model} ...")
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if ts is None:
        ts = starter_transcoders(loaded, progress=say)
        _check_layers(layers, ts, args.layers)
    layers = sorted(ts.layers) if layers is None else layers

    texts = (file_texts(args.corpus) if args.corpus else
             dataset_texts(args.dataset, max_docs=settings.tokens // 4 + 100) if args.dataset else
             stdlib_texts())  # (a dataset is streamed: enough documents for --tokens of 4+ each)
    rows = token_rows(loaded.tokenizer, texts, settings.ctx, max_tokens=settings.tokens)
    # whole rows, the fewest whose non-BOS tokens reach --tokens (or all the corpus has)
    per_row = tokens_per_row(rows, loaded.tokenizer.bos_token_id).cumsum(0)
    rows = rows[:int((per_row < settings.tokens).sum()) + 1]
    corpus = (f"files {', '.join(args.corpus)}" if args.corpus else
              f"dataset {args.dataset}" if args.dataset else "Python standard-library docstrings")
    meta = {"model": loaded.name, "transcoders": ts.source or "starter", "what": ts.what,
            "site_in": ts.site_in, "site_out": ts.site_out,
            "transcoder_info": {k: v for k, v in ts.info.items() if isinstance(v, (str, int, float, bool))},
            "corpus": corpus}
    say(f"scanning {rows.shape[0]} rows x {rows.shape[1]} tokens on layers {layers} ...")
    try:
        res = build_pages(loaded.model, loaded.tokenizer, ts, rows, layers, out,
                          settings=settings, json_files=not args.no_json, meta=meta,
                          bar=not args.quiet, say=say, ray=args.ray, workers=args.workers,
                          threads=args.threads,
                          loader=functools.partial(load_for_scan, args.model, args.transcoders,
                                                   args.device, args.dtype) if args.ray else None)
    except KeyboardInterrupt:
        print(f"cltrace features: interrupted; the scan is checkpointed in {out}/.work, rerun "
              "the same command to resume", file=sys.stderr)
        return 130
    except RuntimeError as e:  # --ray: actors kept dying, or Ray could not place them
        if not args.ray:
            raise
        print(f"cltrace features: error: {e}", file=sys.stderr)
        return 1
    total = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rate = res.n_tokens / res.seconds["scan"] if res.seconds["scan"] > 0 else float("nan")
    print(f"features: {res.n_pages} of {res.n_features} features fired on {res.n_tokens} tokens "
          f"({rate:.0f} tokens/s scan)")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.seconds.items())
          + f"; total {total:.1f}s; peak RSS {rss:.2f} GiB")
    print(f"wrote {out}")
    return 0
