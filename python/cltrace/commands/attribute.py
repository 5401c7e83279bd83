"""``cltrace attribute PROMPT``: build, prune, score and export the attribution graph of a prompt."""
from __future__ import annotations

import argparse
import re
import resource
import time

from ._common import add_prompt_arguments, add_replacement_arguments

NAME = "attribute"
HELP = "compute the attribution graph of a prompt and export it (JSON, DOT, SVG, full graph)"
DESCRIPTION = """\
Trace why the model predicts its next token: run the prompt through the local replacement
model (model + transcoders, errors added back), compute the direct effects between active
features, error nodes, token embeddings and the target logits, prune the graph to what
carries most of the influence, and write it to --out:

  {slug}.json     the pruned graph for Neuronpedia / circuit-tracer's viewer / cltrace serve
                  (+ graph-metadata.json). Its size grows with the kept links: at the defaults
                  a short prompt gives about 1,000 nodes and 100k-300k links, 10-30 MB.
  {slug}.dot, .svg  Graphviz source and picture of the 60 most influential nodes (tens of kB;
                  SVG/PNG need the 'dot' program)
  {slug}.graph.safetensors (+ .json)   --format pt: the full unpruned graph, 4 bytes per
                  (target, node) pair: (features + logits) x nodes, e.g. 130 MB for 5,000
                  features on 9 tokens; read it back with cltrace.Graph.load

With no --transcoders, a TRAINED starter set for the model is used: on the first run, small
per-layer JumpReLU transcoders (width 2048, affine skip) are trained on the model's own
activations over Python standard-library docstrings (about 20 minutes on 2 CPU cores for
Gemma 3 270M; cached and reused after). They are briefly trained on a narrow corpus: for
research, use Gemma Scope 2 (--transcoders google/gemma-scope-2-...) or `cltrace train`.

Examples:
  cltrace attribute "The capital of France is" --out graphs/
  cltrace attribute "Fact: Paris is in" --target " France" --target-diff " France" " Spain"
  cltrace attribute "How do I pick a lock?" --model google/gemma-3-270m-it --chat \\
      --transcoders google/gemma-scope-2-270m-it/transcoder_all/width_16k_l0_small
"""
FORMATS = ("json", "dot", "svg", "png", "pt")
MAX_FEATURE_NODES = 7500  # circuit-tracer's CLI default (Neuronpedia offers 1,500-10,000)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_prompt_arguments(p)
    add_replacement_arguments(p)
    p.add_argument("--out", default="graphs", help="output folder (default: graphs)")
    p.add_argument("--slug", default=None, help="graph name (default: from the prompt)")
    p.add_argument("--max-feature-nodes", type=int, default=MAX_FEATURE_NODES, metavar="N",
                   help=f"visit at most N features, most influential first (default "
                        f"{MAX_FEATURE_NODES}, as circuit-tracer; 0 or more than the active "
                        f"features: all). Time and the rows held grow linearly with N")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="targets per backward pass")
    p.add_argument("--node-threshold", type=float, default=0.8, metavar="X",
                   help="cumulative influence kept by node pruning, in (0, 1] (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, metavar="Y",
                   help="cumulative influence kept by edge pruning, in (0, 1] (default 0.98)")
    p.add_argument("--max-n-logits", type=int, default=10, metavar="K", help="at most K logit targets")
    p.add_argument("--desired-logit-prob", type=float, default=0.95, metavar="P",
                   help="logit targets up to this cumulative probability (default 0.95)")
    p.add_argument("--target", action="append", default=[], metavar="TOKEN",
                   help="attribute this next token instead of the salient ones (repeatable)")
    p.add_argument("--target-diff", nargs=2, action="append", default=[], metavar=("A", "B"),
                   help="attribute the logit difference A - B (repeatable)")
    p.add_argument("--format", default="json,dot,svg",
                   help=f"comma-separated outputs among {', '.join(FORMATS)} (default json,dot,svg; "
                        "pt writes the full unpruned graph, see above for sizes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-")
    return slug or "graph"


def _formats(text: str) -> list[str]:
    out = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"--format {text!r}: choose among {', '.join(FORMATS)}")
    return out


def _peak_memory_gib(device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    text = f"peak RSS {rss:.2f} GiB"
    if str(device).startswith("cuda"):
        import torch

        text += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return text


def run(args: argparse.Namespace) -> int:
    from ._common import check_output_dir, load_replacement, messenger, prompt_tokens, read_prompt

    from ..attribution import attribute
    from ..export import render, write_neuronpedia
    from ..graph import check_threshold, graph_scores, prune

    formats = _formats(args.format)
    check_threshold(args.node_threshold, "--node-threshold")
    check_threshold(args.edge_threshold, "--edge-threshold")
    if args.max_feature_nodes < 0:
        raise ValueError(f"--max-feature-nodes must be >= 0, got {args.max_feature_nodes}")
    text = read_prompt(args)
    out = check_output_dir(args.out)
    slug = args.slug or slugify(text)
    if not slug or any(c in slug for c in '/\\\0'):
        raise ValueError(f"--slug {slug!r} must be a non-empty file name (no '/')")
    say = messenger(args.quiet)
    t_start = time.perf_counter()
    times = {}

    t0 = time.perf_counter()
    loaded, rm = load_replacement(args, say)
    transcoders = rm.transcoders
    times["load"] = time.perf_counter() - t0

    prompt, ids = prompt_tokens(loaded.tokenizer, text, args.chat)
    targets = list(args.target) + [tuple(d) for d in args.target_diff]
    say("attributing ...")
    graph = attribute(ids, rm, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
                      max_feature_nodes=args.max_feature_nodes or None, batch_size=args.batch_size,
                      targets=targets or None, verbose=not args.quiet, timings=times)
    graph.prompt = prompt

    t0 = time.perf_counter()
    result = prune(graph, args.node_threshold, args.edge_threshold)
    scores = graph_scores(graph, result)
    times["prune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    written = []
    kw = dict(node_threshold=args.node_threshold, edge_threshold=args.edge_threshold, result=result)
    if "json" in formats:
        written.append(write_neuronpedia(graph, out, slug, **kw))
    for fmt in ("dot", "svg", "png"):
        if fmt in formats:
            try:
                written.append(render(graph, out / f"{slug}.{fmt}", fmt=fmt, **kw))
            except RuntimeError as e:  # no Graphviz: say so, keep the other outputs
                say(f"warning: {e}")
    if "pt" in formats:
        path = out / f"{slug}.graph.safetensors"
        graph.save(path)
        written.append(path)
    times["export"] = time.perf_counter() - t0

    kept_nodes, kept_edges = int(result.node_mask.sum()), int(result.edge_mask.sum())
    print(f"graph {slug}: {graph.n_nodes} nodes ({graph.n_features} features, {graph.n_logits} logits), "
          f"{int((graph.edges != 0).sum())} edges; pruned to {kept_nodes} nodes, {kept_edges} edges")
    top = ", ".join(f"{l!r} p={p:.3f}" for l, p in zip(graph.logit_labels, graph.logit_probs.tolist()))
    print(f"targets: {top}")
    print(f"scores: replacement {scores.replacement:.3f}, completeness {scores.completeness:.3f}")
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
          + f"; total {time.perf_counter() - t_start:.2f}s; {_peak_memory_gib(rm.device)}")
    if transcoders.info.get("synthetic"):
        print("note: SYNTHETIC starter transcoders (not trained): the graph is exact for them, "
              "but their features have no learned meaning")
    elif transcoders.info.get("trained") and transcoders.info.get("description"):
        print(f"transcoders: {transcoders.info['description']}")
    for p in written:
        print(f"wrote {p}")
    return 0
