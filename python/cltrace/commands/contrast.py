"""``cltrace contrast A B --out DIR``: the features that tell two sets of prompts apart."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys

from ._common import add_features_argument, add_replacement_arguments
from .attribute import add_trace_arguments, trace_settings
from ..errors import UsageError
from ..settings import add_options, from_args

NAME = "contrast"
HELP = "trace two sets of prompts and rank the features that differ between them"
DESCRIPTION = """\
Trace the prompts of two sets as 'cltrace batch' does (worker processes or --ray; resumable;
bad prompts recorded), then for every feature kept in at least --min-count pruned graphs:
per set the mean of its activation (largest over its kept positions, 0 where the pruned graph
drops it) and of its influence on the prompt's targets, the share of graphs that keep it;
between the sets the difference of means, Hedges' g, a two-sided permutation p-value
(--permutations relabellings, exact when there are fewer) and a Benjamini-Hochberg q-value.

The sets: two files A and B (text, one prompt a line, or the JSONL of 'cltrace batch': prompt
or messages, slug, target, target_diff, chat, label, pair), named by their file names (--names
to rename them), or one JSONL whose 'label' column takes two values. Graphs are written as {set}-{slug}.json.

Minimal pairs: prompts that share a 'pair' id (JSONL column; e.g. "the cat sat" in A and "the
dog sat" in B) are compared position by position. Each pair id needs exactly one prompt in each
set, and the two prompts the same number of tokens (checked with the model's tokenizer before
any tracing); prompts without 'pair' are not paired. For every pair, pair-{id}.json holds the
union of the two pruned graphs (features keyed by layer, index and position; tokens and error
nodes by position; logits by token), each node and edge marked as in A only, B only or both,
with its value in A, in B and the difference B - A; differing tokens read "a|b". The viewer
opens it with a diff mode: colour by carrier (A / B / both) or by the difference.

Written to --out DIR:
  contrast.json          the features ranked by the q-value of --by (activation or influence)
  common-{set}.json      each set's common circuit: the nodes and edges in at least
                         --min-share of its graphs (positions counted from the end), one graph
  pair-{id}.json         each minimal pair's difference graph (listed in contrast.json "pairs")
  {set}-{slug}.json ...  the prompts' graphs, features/, manifest.jsonl (as cltrace batch)
Open the report with 'cltrace serve DIR' and the page /contrast.html.

Exit status: 0, 3 some prompts failed (the report is written from the others), 2 bad input
(an unknown column, a set too small for the test, a pair id without one prompt in each set,
a pair whose prompts differ in length: before any tracing), 130 interrupted (rerun
to resume).

Examples:
  cltrace contrast opposites.jsonl synonyms.jsonl --out runs/opp-syn --workers 2
  cltrace contrast tense.jsonl --out runs/tense --by influence
  cltrace contrast --report runs/tense --min-share 0.75
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..contrast import ContrastSettings

    p.add_argument("sets", metavar="SET", nargs="*", help="two prompt files, or one JSONL with a 'label' column")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder or fsspec URL")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="rebuild the report of DIR from its stored graphs (no tracing)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), default=None, help="the two sets' names")
    add_options(p, ContrastSettings)
    p.add_argument("--workers", type=int, default=None, metavar="N", help="as cltrace batch")
    p.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS", help="as cltrace batch")
    p.add_argument("--threads", type=int, default=0, metavar="T", help="as cltrace batch")
    p.add_argument("--chat", action="store_true", help="wrap every prompt in Gemma's chat turn")
    add_replacement_arguments(p)
    add_trace_arguments(p, formats="json")
    add_features_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _settings(args):
    from ..contrast import ContrastSettings

    return from_args(ContrastSettings, args).check()


def read_sets(args) -> tuple[list[str], list[list]]:
    """(the two names, each set's PromptSpecs with set-prefixed slugs), checked before tracing."""
    from pathlib import Path

    from ..batch.prompts import read_prompts
    from ..contrast.sets import check_sizes, labels_of, set_prefix

    if len(args.sets) not in (1, 2):
        raise UsageError(f"give two prompt files, or one JSONL with a 'label' column (got {len(args.sets)})")
    specs = [read_prompts(f, chat=args.chat) for f in args.sets]  # unknown columns: refused there
    if len(args.sets) == 2:
        names = [Path(f).stem for f in args.sets]
        sets = specs
    else:
        names, member = labels_of(args.sets[0], specs[0])
        sets = [[s for s, m in zip(specs[0], member) if m == i] for i in range(2)]
    names = list(args.names) if args.names else names
    if set_prefix(names[0]) == set_prefix(names[1]):
        raise UsageError(f"the two sets need different names (got {names[0]!r} and {names[1]!r}): use --names A B")
    check_sizes(names, [len(s) for s in sets], args.n_perm, args.alpha)
    sets = [[dataclasses.replace(s, slug=f"{set_prefix(n)}-{s.slug}") for s in ss] for n, ss in zip(names, sets)]
    _check_pairs(args, names, sets)
    return names, sets


def _check_pairs(args, names: list[str], sets: list[list]) -> None:
    """The minimal pairs (prompts with a ``pair`` id): one prompt in each set, the same number
    of tokens (counted with the model's tokenizer alone, no weights loaded)."""
    from ..contrast.pairs import check_lengths, check_pairs, n_tokens
    from ..contrast.sets import set_prefix
    from ..models import DEFAULT_MODEL, load_tokenizer

    pairs = check_pairs(names, sets)
    if not pairs:
        return
    if any(set_prefix(n) == "pair" for n in names):
        raise UsageError("a set named 'pair' would share the pair graphs' names (pair-{id}.json): use --names A B")
    tokenizer = load_tokenizer(getattr(args, "model", None) or DEFAULT_MODEL)
    check_lengths(pairs, lambda spec: n_tokens(tokenizer, spec))


def _print(report: dict, location: str) -> None:
    a, b = (s["name"] for s in report["sets"])
    by = report["settings"]["by"]
    print(f"{a} ({len(report['sets'][0]['prompts'])} prompts) vs {b} ({len(report['sets'][1]['prompts'])}): "
          f"{report['n_tested']} of {report['n_features']} features tested, {report['n_significant']} "
          f"with q <= {report['settings']['alpha']} ({by})")
    for r in report["features"][:10]:
        m = r[by]
        g = m["g"] if isinstance(m["g"], str) else f"{m['g']:.3g}"
        print(f"  L{r['layer']} #{r['feature']}: {by} {m['mean'][0]:.3g} vs {m['mean'][1]:.3g}, g {g}, "
              f"p {m['p']:.3g}, q {m['q']:.3g}, kept "
              f"{r['kept_share'][0]:.0%}/{r['kept_share'][1]:.0%}  {r['label']}")
    pairs = report.get("pairs", [])
    built = [p for p in pairs if p["graph"]]
    for p in pairs:
        if not p["graph"]:
            print(f"  pair {p['id']!r}: no difference graph ({p['error']})")
    extra = f", {len(built)} pair graphs (pair-{{id}}.json)" if pairs else ""
    print(f"wrote {location}/contrast.json and {', '.join(c['graph'] for c in report['common'])}{extra} "
          f"in {report['seconds']:.2f}s; open with: cltrace serve {location}  (page /contrast.html)")


def run(args: argparse.Namespace) -> int:
    from ..batch.store import Store
    from ..contrast import build_report

    settings = _settings(args)
    if args.report is not None:
        store = Store(args.report)
        if store.get("contrast-sets.json") is None:
            raise UsageError(f"--report {args.report}: no contrast-sets.json (not a cltrace contrast folder)")
        report = build_report(store, settings)
        _print(report, store.location)
        return 0
    from ..batch.runner import run_batch
    from ..contrast.report import SETS_FILE, sets_json
    from ._common import check_features_dir
    from .batch import load_for_worker

    if args.out is None:
        raise UsageError("give --out DIR (or --report DIR)")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    names, sets = read_sets(args)
    trace = trace_settings(args)
    check_features_dir(args.features)
    store = Store(args.out).check_writable()
    store.put(SETS_FILE, sets_json(names, sets))
    loader = functools.partial(load_for_worker, args.model, args.transcoders, args.device,
                               args.dtype, args.skip_positions, args.features)
    try:
        res = run_batch(sets[0] + sets[1], store, trace, loader, workers=args.workers, ray=args.ray,
                        threads=args.threads, progress=not args.quiet)
    except KeyboardInterrupt:
        print("cltrace contrast: interrupted; the prompts done are recorded, rerun to resume", file=sys.stderr)
        return 130
    except RuntimeError as e:
        print(f"cltrace contrast: error: {e}", file=sys.stderr)
        return 1
    print(f"{res.ok} ok, {res.failed} failed, {res.skipped} skipped (done before) of {res.total} prompts "
          f"in {res.seconds:.1f}s")
    report = build_report(store, settings)
    _print(report, store.location)
    return 0 if res.failed == 0 else 3
