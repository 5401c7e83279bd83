"""``cltrace steer PROMPT --feature L:F[@POS]=V ...``: intervene on features, compare before/after."""
from __future__ import annotations

import argparse
import re

from ._common import add_image_argument, add_prompt_arguments, add_replacement_arguments
from ..errors import UsageError
from ..settings import add_options, from_args

NAME = "steer"
HELP = "set, scale or add to transcoder features or SAE latents and compare predictions and text"
DESCRIPTION = """\
Intervene on transcoder features and show what changes: the top next tokens after the
prompt and the generated continuation, before and after the intervention.

A feature is given as LAYER:FEATURE, optionally @POS, then one operation:
  L:F=VALUE      set the activation to VALUE (0 ablates the feature)
  L:F*SCALE      multiply the activation by SCALE (quote it: '*' is a shell wildcard)
  L:F+ADD        add ADD to the activation (activates an inactive feature)
POS is a token position (negative counts from the end: -1 is the last prompt token) or a
slice START:STOP (either end may be left out, e.g. 3:7, 4:, :-1); without @POS, every
position with features.

--mode free (default): the real model, with (new - old activation) x decoder added to the
MLP output of every layer the feature writes to; everything downstream is recomputed.
--mode frozen: the local replacement model of the attribution graph: attention patterns,
norm denominators and error nodes frozen, downstream features re-encoded (--freeze-features
holds them fixed too). Generation always uses free mode.

--sae SET steers with SAE latents instead (a Gemma Scope 2 SAE folder or reference at
resid_post, attn_out or mlp_out, e.g. one made by `cltrace train --site resid_post`): the
same L:F[@POS] syntax names layer L's SAE and its latent F, and free mode changes the
activation at that SAE's site by (new - old activation) x W_dec[F]: +4 adds 4 x W_dec[F],
=4 clamps the latent at 4 (adds (4 - a) x W_dec[F], a from encoding the site), *2 doubles it.
The SAE's reconstruction error stays; everything downstream is the real model.

A set of prompts (the causal test of an intervention on a behaviour): --prompts SET (the
batch format: text lines, or JSONL with "prompt" or "messages", "slug", ...) and --metric M,
measured on each prompt before and after the interventions:
  logit-diff:"A","B"   logit of token A minus token B at the last position (one token each)
  logprob:"TEXT"       log-probability of the continuation TEXT given the prompt (teacher-forced)
  match:REGEX          1 if the generated text (--max-new-tokens) matches REGEX, else 0: the
                       mean is the fraction of generations that match (e.g. a refusal phrase)
It prints each prompt's metric before and after, the mean change with a 95% percentile
bootstrap interval (--resamples, seeded by --seed) and a two-sided paired sign-flip test
(exact over all 2^n sign flips up to 12 prompts), and --out FILE.json/.jsonl writes them.
--mode frozen measures logit-diff only. By default a plain loop in this process; --ray
[ADDRESS] deals the prompts out to --workers N Ray actors (a new local cluster without
ADDRESS; default one actor per GPU, else per CPU), each loading the model once, and gathers
the rows back in prompt order: the same numbers as the loop (needs pip install 'cltrace[ray]').

The causal check of a contrast report (`cltrace contrast A B --out DIR`): --contrast DIR
--metric M intervenes on the --top K top-ranked features of DIR/contrast.json that are
significant (q <= alpha; fewer if fewer are, and it says so; --all-ranked: the top K whatever
their q), each with --op (default =0 at every position: ablated; e.g. --op @-1=0 or --op
'*0.5'), and runs the set test on each set's prompts (DIR/contrast-sets.json), locally or with
--ray. --feature adds interventions after those (applied to both sets). It prints each set's
mean before -> after, the change with its interval and the paired test, and writes
DIR/ablation.json (the features, the metric, each set's rows and summary), which the report
page (cltrace serve DIR, /contrast.html) shows. Give the same --model and --transcoders
(or --sae) the folder was traced with.

An image in the prompt (multimodal Gemma 3, 4B/12B/27B): --image PATH (repeatable; one
<start_of_image> in PROMPT per image, or none to have the images first) with --transcoders or
--sae for the checkpoint's language model. The command prints each image's positions (its
soft tokens, <img r,c> on the image's grid), which @POS can name: an intervention there acts on
that patch's soft token, and as one image's soft tokens attend to each other both ways, it
changes the image's earlier positions too. Free and frozen mode, SAE latents and generation
work as for text (the generated tokens are text after the image). In a SET (--prompts), a
row names its images in an "images" column (files relative to the SET's folder), as for
`cltrace batch`; the model is then loaded as the multimodal one for every row.

A conversation instead of PROMPT: --messages FILE, a JSON list of {"role", "content"}
messages (system, user, model/assistant; a last model message is a prefill); in a SET, a
"messages" column.

With no --transcoders (and no --sae), the starter set of `cltrace attribute` is used (small transcoders that
cltrace trains on the first run and caches; see `cltrace attribute --help`).

Examples:
  cltrace steer "The capital of France is" --feature 8:1234@-1=0
  cltrace steer "The capital of France is" --feature '12:77*4' --feature 3:10@2:5+20 \\
      --max-new-tokens 30 --steer-generated
  cltrace steer "Fact: Paris is in" --feature 5:42=0 --mode frozen --max-new-tokens 0
  cltrace steer "The weather today is" --sae sae/ --feature 6:123+40 --steer-generated
  cltrace steer --prompts capitals.jsonl --feature '8:1234*0' --metric 'logit-diff:" Paris"," London"'
  cltrace steer --prompts harmful.jsonl --feature 6:77+8 --metric 'match:(?i)I cannot' --out r.json
  cltrace steer --prompts capitals.jsonl -f 8:1234=0 --metric 'logprob:" Paris"' --ray --workers 4
  cltrace steer --contrast runs/opp-syn --top 3 --metric 'logit-diff:" hot"," cold"'
  cltrace steer --model google/gemma-3-4b-it --transcoders T --image cat.png --chat \
      "What is in <start_of_image> this picture?" --feature 10:321=0
"""

_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@\s*([^=*+\s]*))?\s*([=*+])\s*(\S.*?)\s*$")


def parse_pos(text: str):
    """``'5'``, ``'-1'`` -> int; ``'3:7'``, ``':-1'``, ``'4:'`` -> slice."""
    def num(t: str):
        t = t.strip()
        return None if t == "" else int(t)

    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            return slice(num(parts[0]), num(parts[1]))
        return int(text)
    except ValueError:
        raise UsageError(f"position {text!r} is not an int or a START:STOP slice") from None


def parse_feature(text: str):
    """``L:F[@POS]=V`` / ``*S`` / ``+A`` -> :class:`~cltrace.steering.modes.Intervention`."""
    from ..steering import Intervention

    m = _SPEC.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected LAYER:FEATURE[@POS]=VALUE, *SCALE or +ADD (e.g. 8:1234@-1=0)")
    layer, feature, pos, op, value = m.groups()
    try:
        number = float(value)
        kw = {"=": "set", "*": "scale", "+": "add"}[op]
        return Intervention(int(layer), int(feature), pos=None if not pos else parse_pos(pos),
                            **{kw: number})
    except ValueError as e:
        msg = str(e) if "could not convert" not in str(e) else f"{value!r} is not a number"
        raise argparse.ArgumentTypeError(f"{text!r}: {msg}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..steering.ablation import AblationSettings

    add_prompt_arguments(p, messages=True)
    add_image_argument(p, "--transcoders or --sae")
    p.add_argument("--feature", "-f", dest="features", action="append", type=parse_feature,
                   default=None, metavar="L:F[@POS]{=V|*S|+A}",
                   help="an intervention (repeatable; applied in the order given; needed "
                        "except with --contrast)")
    add_replacement_arguments(p)
    p.add_argument("--sae", default=None, metavar="SET",
                   help="steer with the latents of these SAEs (folder or reference; "
                        "resid_post, attn_out or mlp_out) instead of transcoder features")
    p.add_argument("--mode", choices=("free", "frozen"), default="free",
                   help="free: the real model (default); frozen: the replacement model of the graph")
    p.add_argument("--freeze-features", action="store_true",
                   help="frozen mode: also hold every other feature at its clean value")
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="next tokens to list (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=20, metavar="N",
                   help="tokens to generate before and after (default 20; 0: no generation)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (default 0: greedy)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--steer-generated", action="store_true",
                   help="apply the interventions to generated tokens too (POS resolved against "
                        "the growing text: no @POS or an open slice covers new tokens)")
    g = p.add_argument_group("a set of prompts (the causal test; see above)")
    g.add_argument("--prompts", metavar="SET", default=None,
                   help="a prompts file (batch format: text lines or JSONL with prompt or messages)")
    g.add_argument("--metric", metavar="M", default=None, type=_metric,
                   help='logit-diff:"A","B", logprob:"CONTINUATION" or match:REGEX')
    g.add_argument("--out", metavar="FILE", default=None,
                   help="write each prompt's metric and the summary to FILE (.json or .jsonl)")
    g.add_argument("--resamples", type=int, default=10_000, metavar="B",
                   help="bootstrap resamples (and random sign flips above 12 prompts; default "
                        "10000), seeded by --seed")
    g.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="measure the prompts on a Ray cluster (ray.init(ADDRESS); a new local one "
                        "without ADDRESS); needs pip install 'cltrace[ray]'")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: actors, each loading the model once (default: one per GPU, "
                        "else one per CPU)")
    g.add_argument("--threads", type=int, default=0, metavar="T",
                   help="with --ray: torch threads per actor (default: the cluster's CPUs split "
                        "between the actors)")
    c = p.add_argument_group("the causal check of a contrast report (see above)")
    c.add_argument("--contrast", metavar="DIR", default=None,
                   help="a cltrace contrast folder: intervene on its top features, on both sets")
    add_options(c, AblationSettings)
    p.add_argument("--quiet", action="store_true", help="no progress messages")


def _metric(text: str):
    from ..steering.metrics import parse_metric

    try:
        return parse_metric(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--metric {text!r}: ")) from None


def top_table(before, after, decode, k: int) -> list[str]:
    """Rows 'rank  token p  |  token p' of the k most likely next tokens before and after."""
    import torch

    pb, pa = torch.softmax(before.float(), -1), torch.softmax(after.float(), -1)
    tb, ta = pb.topk(k), pa.topk(k)
    width = 28
    rows = [f"{'':>3}  {'before':<{width}}  {'after':<{width}}"]
    for i in range(k):
        cells = []
        for top in (tb, ta):
            tok = int(top.indices[i])
            cells.append(f"{decode(tok)!r:<18} p={float(top.values[i]):.4f}"[:width].ljust(width))
        rows.append(f"{i + 1:>3}  {cells[0]}  {cells[1]}")
    return rows


def run(args: argparse.Namespace) -> int:
    from ..pipeline import image_prompt_text
    from ..steering import generate, intervene
    from ..steering.inputs import state_input
    from ..models import prompt_tokens
    from ._common import (check_images, load_multimodal_replacement, load_replacement, messenger,
                          read_prompt_or_messages)

    from .steer_set import run_contrast, run_set

    if args.image and (args.prompts is not None or args.contrast is not None):
        raise UsageError("--image goes with one PROMPT (or --prompt-file); a set's prompts name "
                         "their images in the 'images' column of the prompts file")
    if args.contrast is not None:
        return run_contrast(args)
    from ..steering.ablation import AblationSettings

    if from_args(AblationSettings, args) != AblationSettings():
        raise UsageError("--top, --op and --all-ranked choose a contrast report's features: give --contrast DIR")
    if args.prompts is not None or args.metric is not None:
        return run_set(args)
    if args.out is not None:
        raise UsageError("--out writes the results of --prompts SET --metric M")
    if args.ray is not None or args.workers is not None:
        raise UsageError("--ray and --workers measure a set: give --prompts SET --metric M (or --contrast DIR)")
    if not args.features:
        raise UsageError("give at least one --feature L:F[@POS]{=V|*S|+A}")
    text, messages = read_prompt_or_messages(args)
    images = check_images(args)
    if images:
        text = image_prompt_text(text, len(images))
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.freeze_features and args.mode != "frozen":
        raise UsageError("--freeze-features needs --mode frozen")
    say = messenger(args.quiet)
    if args.sae is not None:
        return run_sae(args, text, say, messages, images)

    loaded, rm = (load_multimodal_replacement if images else load_replacement)(args, say)
    transcoders = rm.transcoders
    tok = loaded.tokenizer
    prompt, ids = prompt_tokens(tok, text, args.chat, messages, images, loaded if images else None)

    state = rm.run(ids)
    res = intervene(rm, None, args.features, mode=args.mode, freeze_features=args.freeze_features,
                       state=state)
    decode = lambda t: tok.decode([t])  # noqa: E731
    k = min(args.top_k, res.logits.shape[-1])
    print(f"prompt: {prompt!r} ({state.n_pos} tokens)")
    print_images(images, state.image_groups, state.labels)
    print(f"interventions ({args.mode} mode): " + ", ".join(str(iv) for iv in res.interventions))
    print(f"top {k} next tokens:")
    print("\n".join(top_table(res.clean_logits[-1], res.logits[-1], decode, k)))
    top = int(res.clean_logits[-1].argmax())
    lb, la = float(res.clean_logits[-1, top]), float(res.logits[-1, top])
    pb = float(res.clean_logits[-1].float().softmax(-1)[top])
    pa = float(res.logits[-1].float().softmax(-1)[top])
    print(f"top token before, {decode(top)!r}: p {pb:.4f} -> {pa:.4f}, logit {lb:.3f} -> {la:.3f}")
    if args.max_new_tokens:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        start = state_input(state)  # (an image prompt's soft tokens computed once)
        before = generate(rm, start, [], **kw)
        after = generate(rm, start, args.features, steer_generated=args.steer_generated, **kw)
        print(f"generated before: {before.text!r}")
        print(f"generated after:  {after.text!r}")
    if transcoders.info.get("synthetic"):
        print("note: SYNTHETIC starter transcoders (not trained): their features have no learned meaning")
    return 0


def run_sae(args: argparse.Namespace, text: str, say, messages=(), images=()) -> int:
    """``--sae SET``: steer with SAE latents in the real model (free mode), same output."""
    from ..models import prompt_tokens
    from ..steering import generate
    from ..steering.inputs import model_input

    st, saes = load_sae_steering(args, say, images)
    tok = st.tokenizer
    prompt, ids = prompt_tokens(tok, text, args.chat, messages, images, st.images)
    start = model_input(st, ids)  # token ids, or an image prompt's embeddings (computed once)
    tokens = start.tokens
    ivs = st.check(args.features, tokens)  # positions against the prompt, before any pass
    clean, steered = st.logits(start), st.logits(start, ivs)  # [n_pos, vocab] each
    decode = lambda t: tok.decode([t])  # noqa: E731
    k = min(args.top_k, clean.shape[-1])
    print(f"prompt: {prompt!r} ({tokens.numel()} tokens)")
    if images:
        print_images(images, start.image_groups, st.images.token_labels(ids))
    print(f"interventions (free mode, SAE latents at {st.site}): " + ", ".join(map(str, ivs)))
    print(f"top {k} next tokens:")
    print("\n".join(top_table(clean[-1], steered[-1], decode, k)))
    top = int(clean[-1].argmax())
    pb, pa = float(clean[-1].float().softmax(-1)[top]), float(steered[-1].float().softmax(-1)[top])
    print(f"top token before, {decode(top)!r}: p {pb:.4f} -> {pa:.4f}, logit "
          f"{float(clean[-1, top]):.3f} -> {float(steered[-1, top]):.3f}")
    if args.max_new_tokens:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        before = generate(st, start, [], **kw)
        after = generate(st, start, ivs, steer_generated=args.steer_generated, **kw)
        print(f"generated before: {before.text!r}")
        print(f"generated after:  {after.text!r}")
    if saes.info.get("synthetic"):
        print("note: SYNTHETIC SAEs (not trained): their latents have no learned meaning")
    return 0


def load_sae_steering(args: argparse.Namespace, say, images=()):
    """(SaeSteering, SAE set) of --sae SET on --model (with ``images``: the multimodal model,
    which also runs image prompts), checked (SAEs and latents before the model loads)."""
    from ..models import load_model, load_multimodal
    from ..steering import SaeSteering
    from ..steering.sae import check_latents, check_sae_set
    from ..transcoders import load_transcoders

    if args.transcoders is not None:
        raise UsageError("give --sae or --transcoders, not both")
    if args.mode != "free":
        raise UsageError("--sae steers the real model: --mode frozen needs transcoders")
    say(f"loading SAEs {args.sae} ...")
    saes = load_transcoders(args.sae)
    check_sae_set(saes, args.sae)
    check_latents(args.features, saes, args.sae)
    say(f"loading {'multimodal ' if images else ''}model {args.model} ...")
    loaded = (load_multimodal if images else load_model)(args.model, device=args.device,
                                                          dtype=args.dtype)
    st = SaeSteering(loaded.model, saes, tokenizer=loaded.tokenizer, model_name=loaded.name,
                     skip_positions=args.skip_positions, images=loaded if images else None)
    return st, saes


def print_images(images, groups, labels) -> None:
    """One line per image of the prompt: its file and the positions of its soft tokens (what
    @POS names), with their first and last labels (``<img r,c>``)."""
    for i, path in enumerate(images):
        pos = (groups == i).nonzero().flatten().tolist()  # groups [n_pos]: image of each position
        print(f"image {i + 1} ({path}): positions {pos[0]}:{pos[-1] + 1} ({labels[pos[0]]} .. "
              f"{labels[pos[-1]]})")
