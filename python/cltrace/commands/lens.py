"""``cltrace lens "text"``: the top active latents of dictionary sets (SAEs, transcoders, CLTs,
crosscoders) at every token of a text, layer by layer (:func:`cltrace.lens.feature_lens`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._common import (add_image_argument, add_model_arguments, add_prompt_arguments, messenger,
                      read_prompt)
from ..errors import UsageError

NAME = "lens"
HELP = "the top active latents of dictionaries at each token of a text (a feature lens)"
DESCRIPTION = """\
For each token of a text, the top --top-k active latents of each dictionary set at each of
its layers, with their activation (and label, from feature pages given with --features, or
the starter set's own pages when `cltrace attribute` has built them): one
forward pass, then a JumpReLU encode per layer. Sets: --dict SET, repeated (SAEs at
resid_post, attn_out or mlp_out, transcoders, CLTs, crosscoders; a folder in the Gemma Scope 2
or circuit-tracer layout, or a hub reference); default: the starter transcoders. Each set
reads its own site at its layer (a crosscoder: resid_post of each of its layers).

<bos> positions are listed but not encoded (Gemma Scope 2 dictionaries are trained without
them); --bos encodes them too. It prints one line per token, set and layer; --json writes the
lens as JSON (with, for sets given --features, their feature pages copied beside it), which
`cltrace serve DIR` shows on its lens page (/lens.html): a token x layer grid whose cells open
the feature card.

Images (--image PATH, repeatable; a multimodal Gemma 3 --model, 4B/12B/27B, and --dict sets of
its language model): each image goes where the text has <start_of_image> (none: the images
first; --chat: in the user turn). The pass reads the image's soft tokens (256 per image in
the released models) with the model's bidirectional attention among them, so the latents at
image and text positions are those of the multimodal model. Soft tokens are named <img r,c>
by their cell (row, column) on the image's 16x16 grid (4x4 patches of 14 pixels each). The
table prints text tokens as above and each image as one line; below it, per image, set and
layer, the image's top --top-k latents by their largest activation on the image, each with
the number of patches it fires on and its --top-patches strongest patches (r,c:activation).
--all-patches prints a line per soft token too. --json copies each image beside the JSON
(<stem>.image1.png ...) and records its grid, positions and, per layer, the activation of
every latent the lens shows at each patch: /lens.html draws the image with a heatmap of the
selected latent over its patches.

Examples:
  cltrace lens "The capital of France is Paris"
  cltrace lens --prompt-file notes.txt --dict google/gemma-scope-2-270m-pt/resid_post_all/width_16k_l0_small \\
      --dict starter --layers 6-11 --top-k 3 --json out/lens.json
  cltrace serve out      # then open http://127.0.0.1:8000/lens.html
  cltrace lens --model google/gemma-3-4b-it --dict SAES --chat --image cat.png \\
      "What is in <start_of_image> this picture?" --top-patches 5 --json out/cat-lens.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..lens.report import TOP_PATCHES
    from ..settings import parse_layers

    add_prompt_arguments(p)
    p.add_argument("--dict", "--sae", dest="dicts", action="append", default=None, metavar="SET",
                   help="a dictionary set (folder or hub reference; 'starter': the starter "
                        "transcoders); repeat for several. Default: the starter transcoders")
    p.add_argument("--features", action="append", default=None, metavar="DIR",
                   help="feature pages (cltrace features --out DIR) of the i-th set, for labels "
                        "and links; repeat in the order of --dict ('none' to skip a set)")
    p.add_argument("--layers", type=parse_layers, default=None, metavar="LIST",
                   help="only these layers, e.g. '0-5,9' (each set must have them); default: all of each set's")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="latents per token and layer (default 5)")
    p.add_argument("--bos", action="store_true", help="encode <bos> positions too")
    add_image_argument(p, "--dict sets of its language model")
    p.add_argument("--top-patches", type=int, default=TOP_PATCHES, metavar="N",
                   help=f"with --image: the strongest patches listed per latent of an image (default {TOP_PATCHES})")
    p.add_argument("--all-patches", action="store_true",
                   help="with --image: also print one line per soft token (256 per image), as for text tokens")
    add_model_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH", help="write the lens as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.error = _one_line_error


def _one_line_error(message: str):
    print(f"cltrace lens: error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_images(args: argparse.Namespace, refs: list[str]) -> tuple:
    """Before the model loads: the --image files (:func:`._common.check_images`: each an
    image, a multimodal --model), and --dict sets given (the starter set is text-only)."""
    if not args.image:
        return ()
    if not args.dicts or "starter" in refs:
        raise UsageError("--image needs --dict SET (dictionaries of the multimodal model's language "
                         "model; the starter set is the text-only 270M's)")
    from ._common import check_images

    return check_images(args)


def _load_model(args: argparse.Namespace, images: bool, say):
    """The --model: a LoadedMultimodal with images, else a LoadedModel."""
    if images:
        from ..models.multimodal import load_multimodal

        say(f"loading multimodal model {args.model} ...")
        return load_multimodal(args.model, device=args.device, dtype=args.dtype)
    from ..models import load_model

    say(f"loading model {args.model} ...")
    return load_model(args.model, device=args.device, dtype=args.dtype)


def _load_sets(refs: list[str], loaded, say) -> list:
    """The sets of --dict, in order ('starter': the starter transcoders)."""
    from ..transcoders import load_transcoders

    out = []
    for ref in refs:
        if ref == "starter":
            from ..training.starter import starter_transcoders

            out.append(starter_transcoders(loaded, progress=say, bar=False))
        else:
            say(f"loading dictionaries {ref} ...")
            out.append(load_transcoders(ref, model_config=loaded.model))
    return out


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_text
    from .eval import check_output_file

    text = read_prompt(args)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    refs = args.dicts or ["starter"]
    features = args.features or []
    if len(features) > len(refs):
        raise UsageError(f"{len(features)} --features for {len(refs)} set(s): give one per --dict, in order")
    for f in features:
        from ._common import check_features_dir

        check_features_dir(f)
    if args.top_patches < 1:
        raise UsageError(f"--top-patches must be >= 1, got {args.top_patches}")
    images = _check_images(args, refs)
    if images:
        from ..pipeline import image_prompt_text

        text = image_prompt_text(text, len(images))
    json_path = check_output_file(args.json, "--json")
    say = messenger(args.quiet)

    from ..lens import feature_lens

    loaded = _load_model(args, bool(images), say)
    if loaded.tokenizer is None:
        raise UsageError(f"model {args.model} has no tokenizer; the lens reads text")
    sets = _load_sets(refs, loaded, say)
    names = [str(ts.info.get("set_id", "") or ref) for ts, ref in zip(sets, refs)]
    say(f"lens: {len(sets)} set(s), one forward pass ...")
    report = feature_lens(loaded, sets, text, top_k=args.top_k, layers=args.layers, names=names,
                  chat=args.chat, include_bos=args.bos, images=images)
    pages = _pages(features, sets, refs)
    label = (lambda s, L, i: pages[s].label(L, i) if pages[s] is not None else None) if any(pages) else None
    print(report.summary())
    print(report.table(label=label, patches=args.all_patches))
    if images:
        print()
        print(report.image_table(label=label, patches=args.top_patches))
    if json_path is not None:
        page_of, folders = _copy_pages(report, pages, json_path)
        files = None
        if images:
            from ..export.images import copy_images

            files = [p.name for p in copy_images(images, json_path.parent, json_path.stem)]
        data = report.to_json(label=label, page=page_of, pages=folders, image_files=files)
        data["sources"] = refs
        atomic_write_text(json_path, json.dumps(data, indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {json_path}")
    return 0


def _pages(features: list[str], sets: list, refs: list[str]) -> list:
    """Per set, its FeaturePages or None: --features DIR; for the starter set without one, its
    own pages when they are cached (`cltrace attribute` builds them; the lens does not)."""
    from ..features import FeaturePages
    from ..features.store import LABELS_FILE
    from ..models import cache_root

    out = [None] * len(sets)
    for s, (ts, ref) in enumerate(zip(sets, refs)):
        if s < len(features):
            out[s] = FeaturePages(features[s]) if features[s] != "none" else None
            continue
        set_id = str(ts.info.get("set_id", ""))
        if ref == "starter" and set_id.startswith("cltrace-starter/"):
            folder = cache_root() / "starter" / (set_id.split("/", 1)[1] + "-pages")
            if (folder / LABELS_FILE).is_file():
                fp = FeaturePages(folder)
                out[s] = fp if fp.current else None
    return out


def _copy_pages(report, pages: list, json_path: Path):
    """Copy the pages of the latents the lens shows beside the JSON
    (``<stem>-pages/set<s>/<cantor(layer, latent)>.json``); return (page path of a latent
    relative to the JSON's folder or None, per set the folder of its pages or None)."""
    from ..export.neuronpedia import cantor_pair
    from ..features.store import pages_for_graph

    folders: list = [None] * len(pages)
    have: list = [dict() for _ in pages]
    for s, fp in enumerate(pages):
        if fp is None:
            continue
        shown = {(L, i) for s2, L, _pos, top in report.cells() if s2 == s for i, _a in top}
        sub = f"{json_path.stem}-pages/set{s}"
        have[s] = pages_for_graph(fp, shown, json_path.parent, subdir=sub)["clerps"]
        folders[s] = f"./{sub}"

    def page_of(s: int, L: int, i: int):
        return f"{folders[s][2:]}/{cantor_pair(L, i)}.json" if (L, i) in have[s] else None
    return page_of, folders
