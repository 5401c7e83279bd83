"""``cltrace attribute PROMPT``: build, prune, score and export the attribution graph of a prompt."""
from __future__ import annotations

import argparse
import resource
import time

from ._common import (add_features_argument, add_image_argument, add_prompt_arguments,
                      add_replacement_arguments)

NAME = "attribute"
HELP = "compute the attribution graph of a prompt and export it (JSON, DOT, SVG, full graph)"
DESCRIPTION = """\
Trace why the model predicts its next token: run the prompt through the local replacement
model (model + transcoders, errors added back), compute the direct effects between active
features, error nodes, token embeddings and the target logits, prune the graph to what
carries most of the influence, and write it to --out:

  {slug}.json     the pruned graph for Neuronpedia / circuit-tracer's viewer / cltrace serve
                  (+ graph-metadata.json). Its size grows with the kept links: at the defaults
                  a short prompt gave 551-1,306 nodes and 8k-51k links, 0.75-4.0 MB (the
                  example graphs); with feature pages, features/ beside it holds ~20 kB per
                  kept feature.
  {slug}.svg      a picture of the 60 most influential nodes on the position x layer grid
                  (drawn by cltrace itself, tens of kB)
  {slug}.dot      Graphviz source of the same picture (--format png renders it with Graphviz's
                  'dot' program, if installed)
  With --qk the JSON also splits every kept link by the attention heads its paths cross, and
  traces the scores of the heads carrying the top edges into the most influential nodes to
  the query-side and key-side sources that made them attend there (QK attribution).
  {slug}.graph.safetensors (+ .json)   --format pt: the full unpruned graph, 4 bytes per
                  (target, node) pair: (visited features + logits) x nodes; read it back with
                  cltrace.Graph.load

With no --transcoders, a TRAINED starter set for the model is used: on the first run, small
per-layer JumpReLU transcoders (width 2048, affine skip, L0 32) are trained on the model's own
activations over an offline text mix (docstrings, package descriptions, the Python language
reference, text the model writes), and their feature pages are built to label the graph
(about 15 minutes on a quiet 2-core AVX-512 machine for Gemma 3 270M, conversion included;
longer where matrix products are slower; cached and reused after). They are small and
briefly trained: for research, use Gemma Scope 2 (--transcoders google/gemma-scope-2-...)
or `cltrace train`.

Examples:
  cltrace attribute "The capital of France is" --out graphs/
  cltrace attribute "Fact: Paris is in" --target " France" --target-diff " France" " Spain"
  cltrace attribute "The capital of France is" --qk      # + which heads carried each link, and why
  cltrace attribute "How do I pick a lock?" --model google/gemma-3-270m-it --chat \\
      --transcoders google/gemma-scope-2-270m-it/transcoder_all/width_16k_l0_small
  cltrace attribute --messages chat.json --model google/gemma-3-270m-it --transcoders ...
      (chat.json: [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
       {"role": "model", "content": "Sure, here is"}]: a conversation, the last model turn a
       prefill; nodes on every position after the first turn's <bos><start_of_turn>user\\n)
  cltrace attribute --model google/gemma-3-4b-it --transcoders T --image cat.png --chat \\
      "What is in <start_of_image> this picture?"
      (an image + text prompt: its 256 soft tokens are embedding nodes named <img r,c> by their
       cell on the 16x16 grid, with features and error nodes at their positions; the JSON's
       metadata.info.images and a copy of each image beside it, docs/interop.md "Images")
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prompt_arguments(p, messages=True)
    add_image_argument(p)
    add_replacement_arguments(p)
    p.add_argument("--out", default="graphs", help="output folder (default: graphs)")
    p.add_argument("--slug", default=None, help="graph name (default: from the prompt)")
    add_trace_arguments(p)
    p.add_argument("--target", action="append", default=[], metavar="TOKEN",
                   help="attribute this next token instead of the salient ones (repeatable)")
    p.add_argument("--target-diff", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="attribute the logit difference A - B (repeatable)")
    add_features_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_trace_arguments(p: argparse.ArgumentParser, formats: str = "json,dot,svg") -> None:
    """The options of the graph of every prompt (also those of ``cltrace batch``), made from
    the settings dataclasses (their defaults and help): what :func:`trace_settings` reads."""
    from ..attention import QKSettings
    from ..attribution import AttributionSettings
    from ..graph import PruneSettings
    from ..pipeline import FORMATS
    from ..settings import add_options

    add_options(p, AttributionSettings)
    add_options(p, PruneSettings)
    add_options(p.add_argument_group("attention (--qk; docs/method.md)"), QKSettings)
    p.add_argument("--format", default=formats,
                   help=f"comma-separated outputs among {', '.join(FORMATS)} (default {formats}; "
                        "pt writes the full unpruned graph, see 'cltrace attribute --help' for sizes)")


def trace_settings(args: argparse.Namespace):
    """The checked TraceSettings of the options of :func:`add_trace_arguments`."""
    from ..attention import QKSettings
    from ..attribution import AttributionSettings
    from ..graph import PruneSettings
    from ..pipeline import TraceSettings, parse_formats
    from ..settings import from_args

    return TraceSettings(from_args(AttributionSettings, args), from_args(PruneSettings, args),
                         parse_formats(args.format), from_args(QKSettings, args)).check()


def _peak_memory_gib(device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = f"peak RSS {rss:.2f} GiB"
    if str(device).startswith("cuda"):
        import torch

        text += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def run(args: argparse.Namespace) -> int:
    from ._common import (check_features_dir, check_images, check_output_dir, feature_pages,
                          load_multimodal_replacement, load_replacement, messenger,
                          read_prompt_or_messages)

    from ..pipeline import (IMAGE_PLACEHOLDER, PromptSpec, check_slug, image_prompt_text, slugify,
                            trace_prompt)

    settings = trace_settings(args)
    text, messages = read_prompt_or_messages(args)
    images = check_images(args)
    if images:
        text = image_prompt_text(text, len(images))
    out = check_output_dir(args.out)
    slug = check_slug(args.slug or slugify(text.replace(IMAGE_PLACEHOLDER, " ")))
    check_features_dir(args.features)
    say = messenger(args.quiet)
    t_start = time.perf_counter()
    times = {}

    t0 = time.perf_counter()
    loaded, rm = (load_multimodal_replacement if images else load_replacement)(args, say)
    transcoders = rm.transcoders
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pages = feature_pages(args.features, loaded, transcoders, say)
    if pages is not None:
        times["pages"] = time.perf_counter() - t0
    targets = tuple(args.target) + tuple(tuple(d) for d in args.target_diff)
    spec = PromptSpec(text, slug, targets, args.chat, messages, images=images)
    record = trace_prompt(rm, loaded.tokenizer, spec, settings,
                          out, verbose=not args.quiet, times=times, pages=pages, say=say)
    for w in record.warnings:
        say(f"warning: {w}")
    graph, n = record.graph, record.summary()
    print(f"graph {slug}: {graph.n_nodes} nodes ({graph.n_features} features, {graph.n_logits} logits), "
          f"{n['n_edges']} edges; pruned to {n['kept_nodes']} nodes, {n['kept_edges']} edges")
    top = ", ".join(f"{l!r} p={p:.3f}" for l, p in zip(graph.logit_labels, graph.logit_probs.tolist()))
    print(f"targets: {top}")
    print(f"scores: replacement {record.scores.replacement:.3f}, completeness {record.scores.completeness:.3f}")
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
          + f"; total {time.perf_counter() - t_start:.2f}s; {_peak_memory_gib(rm.device)}")
    if transcoders.info.get("synthetic"):
        print("note: SYNTHETIC starter transcoders (not trained): the graph is exact for them, "
              "but their features have no learned meaning")
    elif transcoders.info.get("trained") and transcoders.info.get("description"):
        print(f"transcoders: {transcoders.info['description']}")
    for p in record.written:
        print(f"wrote {p}")
    return 0
