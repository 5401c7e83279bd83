"""``cltrace batch PROMPTS --out DIR``: trace many prompts with workers that load the model once."""
from __future__ import annotations

import argparse
import functools
import sys

from ._common import add_features_argument, add_replacement_arguments
from .attribute import add_trace_arguments, trace_settings
from ..errors import UsageError

NAME = "batch"
HELP = "trace many prompts (local worker processes or a Ray cluster); summarize recurring features"
DESCRIPTION = """\
Trace every prompt of PROMPTS as 'cltrace attribute' would, with worker processes that each
load the model and transcoders once. PROMPTS is a text file (one prompt a line) or JSONL, one
object a line: {"prompt": ..., "slug": ..., "target": " Paris" or [...],
"target_diff": [" France", " Spain"], "chat": true}; "messages": [{"role": "system"|"user"|
"model"|"assistant", "content": ...}, ...] instead of "prompt" traces a conversation (a last
model message is a prefill); "label" (a string) and "pair" (an id) are carried for the
commands that compare groups, and ignored here; "images": "cat.png" or ["a.png", "b.png"]
puts images in the prompt (as 'cltrace attribute --image'): one <start_of_image> in "prompt"
where each goes, or none to have them first; relative paths are taken from the PROMPTS file's
folder; every file is read and decoded before any model loads. A batch with image rows needs
a multimodal Gemma 3 (--model: a 4B/12B/27B checkpoint folder or hub id) and --transcoders;
its text rows run on the same model. Any other column is an error.

Written to --out (a folder, or an fsspec URL such as s3://bucket/run, gs://..., memory://):
  {slug}.json ...        each prompt's outputs (--format, default json), written whole or not at all
  {slug}.image1.png ...  with images: a copy of each image beside its graph JSON (the viewer's
                         image panel reads it; metadata.info.images names it)
  features/{c}.json      the feature pages of the features the graphs keep (--features; by
                         default the starter set's own pages), as `cltrace attribute` writes them
  manifest.jsonl         one line per prompt traced: status, error, seconds per phase, node and
                         edge counts, scores, kept features, worker, the files written (image
                         copies included) and the image files read ("images", absolute paths)
  graph-metadata.json    every graph of the folder, for the viewers (cltrace serve DIR)
Run it again to resume: prompts done are skipped, failed ones are retried once. A bad prompt
(empty, too long, a target that is not one token) is recorded as failed; the batch goes on.
A malformed row (an unknown column; an image file missing or not an image; more or fewer
<start_of_image> than images) stops the command before any model loads (exit 2), naming the
line and the file.

  --summary DIR          the features kept in the pruned graphs of at least --min-count prompts
                         (layer, feature, count, mean influence, label) -> features-summary.csv/.json

Exit status: 0 every prompt traced, 3 some failed (see the manifest), 130 interrupted (Ctrl-C:
nothing is left half-written; rerun to resume), 2 bad arguments.

Examples:
  cltrace batch prompts.txt --out runs/facts --workers 2
  cltrace batch prompts.jsonl --out s3://bucket/facts --ray auto --max-feature-nodes 2000
  cltrace batch pictures.jsonl --out runs/pics --model google/gemma-3-4b-it --transcoders T
      (pictures.jsonl: {"prompt": "What is in <start_of_image> this picture?", "images":
       "cat.png", "chat": true} ...)
  cltrace batch --summary runs/facts
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", metavar="PROMPTS", nargs="?", default=None,
                   help="a text file (one prompt a line) or a JSONL file of prompts")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder or fsspec URL")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes (default: as many as cores and memory allow; 0: this "
                        "process); with --ray: actors (default: one per GPU, else per CPU)")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (ray.init(ADDRESS); a local one without ADDRESS); "
                        "needs pip install 'cltrace[ray]'")
    p.add_argument("--threads", type=int, default=0, metavar="T",
                   help="torch threads per worker (default: the cores split between the workers)")
    p.add_argument("--chat", action="store_true", help="wrap every prompt in Gemma's chat turn "
                   "(a JSONL 'chat' field overrides it)")
    add_replacement_arguments(p)
    add_trace_arguments(p, formats="json")
    add_features_argument(p)
    p.add_argument("--summary", metavar="DIR", default=None,
                   help="summarize the batch in DIR instead of tracing (see above)")
    p.add_argument("--min-count", type=int, default=2, metavar="K",
                   help="--summary: features kept in at least K prompts (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def load_for_worker(model, transcoders, device, dtype, skip_positions, features=None):
    """(ReplacementModel, tokenizer, FeaturePages or None) from the command's options, in a
    worker (picklable). Without --transcoders the workers of a machine take turns (a file
    lock), so the starter set and its feature pages are built once, by the first, when they
    are not cached yet."""
    import contextlib
    import fcntl

    from ..models import cache_root
    from ._common import feature_pages, load_replacement

    args = argparse.Namespace(model=model, transcoders=transcoders, device=device, dtype=dtype,
                              skip_positions=skip_positions)
    with contextlib.ExitStack() as stack:
        if transcoders is None:
            lock_path = cache_root() / "starter" / ".batch.lock"
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = stack.enter_context(open(lock_path, "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        loaded, rm = load_replacement(args, lambda *a: None)
        pages = feature_pages(features, loaded, rm.transcoders, lambda *a: None)
    return rm, loaded.tokenizer, pages


def load_multimodal_for_worker(model, transcoders, device, dtype, skip_positions, features=None):
    """(ReplacementModel, tokenizer, FeaturePages or None) of a multimodal --model, in a worker
    (picklable): the replacement model of its language model, which runs the image rows and
    the text rows (:func:`~cltrace.commands._common.load_multimodal_replacement`), as
    ``cltrace attribute --image`` builds it."""
    from ._common import feature_pages, load_multimodal_replacement

    args = argparse.Namespace(model=model, transcoders=transcoders, device=device, dtype=dtype,
                              skip_positions=skip_positions)
    loaded, rm = load_multimodal_replacement(args, lambda *a: None)
    pages = feature_pages(features, loaded, rm.transcoders, lambda *a: None)
    return rm, loaded.tokenizer, pages


def _summary(args) -> int:
    from ..batch.runner import write_graph_index
    from ..batch.store import Store
    from ..batch.summary import summarize, write_summary

    store = Store(args.summary)
    rows = summarize(store, min_count=args.min_count)
    n = write_graph_index(store)
    for r in rows[:20]:
        label = f"  {r.label}" if r.label else ""
        print(f"L{r.layer} #{r.feature}: {r.count} prompts, mean influence {r.mean_influence:.4g}{label}")
    print(f"{len(rows)} features in >= {args.min_count} prompts; {n} graphs in graph-metadata.json")
    for path in write_summary(store, rows):
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.summary is not None:
        return _summary(args)
    from ..batch.prompts import read_prompts
    from ..batch.runner import run_batch
    from ..batch.store import Store
    from ._common import check_features_dir, check_image_rows

    if args.prompts is None or args.out is None:
        raise UsageError("give PROMPTS and --out DIR (or --summary DIR)")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    settings = trace_settings(args)
    check_features_dir(args.features)
    specs = read_prompts(args.prompts, chat=args.chat, images_allowed=True)
    images = check_image_rows(specs, args, f"PROMPTS {args.prompts}")
    store = Store(args.out).check_writable()
    loader = functools.partial(load_multimodal_for_worker if images else load_for_worker,
                               args.model, args.transcoders, args.device, args.dtype,
                               args.skip_positions, args.features)
    try:
        res = run_batch(specs, store, settings, loader, workers=args.workers, ray=args.ray,
                        threads=args.threads, progress=not args.quiet)
    except KeyboardInterrupt:
        print("cltrace batch: interrupted; the prompts done are recorded, rerun to resume",
              file=sys.stderr)
        return 130
    except RuntimeError as e:  # a worker died twice, or Ray could not place the actors
        print(f"cltrace batch: error: {e}", file=sys.stderr)
        return 1
    rate = (res.ok + res.failed) / res.seconds * 60 if res.seconds > 0 else 0.0
    print(f"{res.ok} ok, {res.failed} failed, {res.skipped} skipped (done before) of {res.total} "
          f"prompts in {res.seconds:.1f}s ({rate:.1f} prompts/min); manifest {store.location}/manifest.jsonl")
    return 0 if res.failed == 0 else 3
