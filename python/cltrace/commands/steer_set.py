"""The set tests of ``cltrace steer``: ``--prompts SET --metric M`` (a metric before and after
the interventions on every prompt) and ``--contrast DIR`` (ablate a contrast report's top
features on both of its sets), here or on Ray actors. The options and help are steer's
(:mod:`.steer`)."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from ..settings import from_args
from ._common import check_image_rows
from .steer import load_sae_steering, parse_feature


def check_set_args(args: argparse.Namespace) -> None:
    """The options of a set test (--prompts or --contrast), checked before anything loads."""
    if args.metric is None:
        raise UsageError("a prompt set needs --metric M")
    if args.prompt is not None or args.prompt_file is not None or args.messages is not None:
        raise UsageError("give PROMPT (or --prompt-file, --messages) or a set (--prompts SET, "
                         "--contrast DIR), not both")
    if args.resamples < 1:
        raise UsageError(f"--resamples must be >= 1, got {args.resamples}")
    if args.max_new_tokens < 1 and args.metric.generates:
        raise UsageError("match:REGEX reads generated text: --max-new-tokens must be >= 1")
    if args.freeze_features and args.mode != "frozen":
        raise UsageError("--freeze-features needs --mode frozen")
    if args.mode == "frozen" and args.metric.kind != "logit-diff":
        raise UsageError("--mode frozen measures logit-diff only")
    if args.ray is None and (args.workers is not None or args.threads):
        raise UsageError("--workers and --threads count Ray actors: give --ray [ADDRESS] too")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.ray is not None:
        from ..ray_pool import import_ray

        import_ray()  # installed? (one line if not)


def load_sae_for_worker(model, sae, device, dtype, skip_positions, features, images=False):
    """(SaeSteering, tokenizer) of --sae SET on --model (``images``: the multimodal model), in a
    Ray actor (picklable)."""
    ns = argparse.Namespace(model=model, sae=sae, device=device, dtype=dtype, transcoders=None,
                            skip_positions=skip_positions, mode="free", features=features)
    st, _ = load_sae_steering(ns, lambda *a: None, images=images)
    return st, st.tokenizer


def worker_loader(args: argparse.Namespace, interventions, images: bool = False):
    """The picklable loader each Ray actor calls once: (model, tokenizer) of the command's
    --model (``images``: as a multimodal model), --transcoders or --sae, --device, --dtype,
    --skip-positions."""
    import functools

    from .batch import load_for_worker, load_multimodal_for_worker

    if args.sae is not None:
        return functools.partial(load_sae_for_worker, args.model, args.sae, args.device, args.dtype,
                                 args.skip_positions, list(interventions), images)
    load = load_multimodal_for_worker if images else load_for_worker
    return functools.partial(load, args.model, args.transcoders, args.device, args.dtype,
                             args.skip_positions)


def measure_sets(args: argparse.Namespace, sets: list, interventions, say) -> tuple[list, bool, str]:
    """(one SetResult per set of PromptSpecs, synthetic dictionaries?, the model's name) with
    the command's options: here (the model loaded once) or on Ray actors (--ray)."""
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    opts = dict(mode=args.mode, freeze_features=args.freeze_features,
                steer_generated=args.steer_generated, generation=gen,
                n_resamples=args.resamples, seed=args.seed, say=say)
    images = check_image_rows([s for specs in sets for s in specs], args, f"--prompts {args.prompts}")
    if args.ray is not None:
        from ..steering.set_ray import run_sets_ray

        if args.sae is not None:  # the SAEs and latents checked here, before the actors start
            _check_sae_set(args, interventions)
        results = run_sets_ray(worker_loader(args, interventions, images), sets, args.metric,
                               interventions, address=args.ray, workers=args.workers,
                               threads=args.threads, **opts)
        return results, False, str(args.model)
    from ..steering.prompt_set import run_set as measure_set
    from ._common import load_multimodal_replacement, load_replacement

    if args.sae is not None:
        rm, dictionaries = load_sae_steering(_with_features(args, interventions), say, images)
        name = str(args.model)
    else:
        loaded, rm = (load_multimodal_replacement if images else load_replacement)(args, say)
        dictionaries, name = rm.transcoders, loaded.name
    results = [measure_set(rm, rm.tokenizer, specs, args.metric, interventions, **opts) for specs in sets]
    return results, bool(dictionaries.info.get("synthetic")), name


def _with_features(args, interventions):
    ns = argparse.Namespace(**vars(args))
    ns.features = list(interventions)
    return ns


def _check_sae_set(args, interventions) -> None:
    from ..steering.sae import check_latents, check_sae_set
    from ..transcoders import load_transcoders

    if args.transcoders is not None:
        raise UsageError("give --sae or --transcoders, not both")
    if args.mode != "free":
        raise UsageError("--sae steers the real model: --mode frozen needs transcoders")
    saes = load_transcoders(args.sae)
    check_sae_set(saes, args.sae)
    check_latents(list(interventions), saes, args.sae)


def print_result(res, title: str = "", rows: bool = True) -> None:
    """The rows (``rows``) and the summary lines of a SetResult."""
    if rows:
        width = max(len(r.slug) for r in res.rows)
        print(f"{'prompt':<{width}}  {'before':>10}  {'after':>10}  {'change':>10}")
        for r in res.rows:
            print(f"{r.slug:<{width}}  {r.before:>10.4f}  {r.after:>10.4f}  {r.after - r.before:>+10.4f}")
    sm = res.summary
    print(f"{title}mean over {sm.n} prompts: {sm.mean_before:.4f} -> {sm.mean_after:.4f}, change "
          f"{sm.mean_change:+.4f}, {sm.level:.0%} bootstrap interval [{sm.ci_low:+.4f}, "
          f"{sm.ci_high:+.4f}] ({sm.n_resamples} resamples, seed {sm.seed})")
    how = f"exact, all 2^{sm.n} sign flips" if sm.p_exact else f"{sm.n_resamples} random sign flips"
    print(f"{title}paired sign-flip test of no change: p = {sm.p_value:.4g} ({how}, two-sided)")


def run_set(args: argparse.Namespace) -> int:
    """``--prompts SET --metric M``: the metric before and after on every prompt, the mean
    change with its bootstrap interval and the paired sign-flip test
    (:func:`cltrace.steering.prompt_set.run_set`, or
    :func:`cltrace.steering.set_ray.run_set_ray` with --ray)."""
    from pathlib import Path

    from ..batch.prompts import read_prompts
    from ..steering.prompt_set import write_result
    from ._common import messenger

    if args.prompts is None or args.metric is None:
        raise UsageError("a prompt set needs both --prompts SET and --metric M")
    if not args.features:
        raise UsageError("give at least one --feature L:F[@POS]{=V|*S|+A} to measure")
    check_set_args(args)
    if args.out is not None and Path(args.out).suffix not in (".json", ".jsonl"):
        raise UsageError(f"--out {args.out}: name a .json or .jsonl file")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: its folder does not exist")
    specs = read_prompts(args.prompts, chat=args.chat, images_allowed=True)
    say = messenger(args.quiet)
    (res,), synthetic, _ = measure_sets(args, [specs], args.features, say)
    print(f"metric {args.metric.text} ({args.mode} mode), interventions: "
          + ", ".join(res.interventions))
    print_result(res)
    if args.out is not None:
        write_result(res, args.out)
        print(f"wrote {args.out}")
    if synthetic:
        print("note: SYNTHETIC dictionaries (not trained): their features have no learned meaning")
    return 0


def ablation_interventions(features: list[dict], op: str) -> list:
    """One intervention per selected feature: ``L:F`` followed by ``op`` (``=0``, ``@-1=0``, ...)."""
    out = []
    for f in features:
        try:
            out.append(parse_feature(f"{f['layer']}:{f['feature']}{op.strip()}"))
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--op {op!r}: {e}") from None
    return out


def traced_model(store, sets) -> str | None:
    """The model named in the first stored graph of the contrast folder (None if none is)."""
    import json

    for spec in (s for ss in sets for s in ss):
        raw = store.get(f"{spec.slug}.json")
        if raw:
            try:
                return json.loads(raw)["metadata"]["info"].get("model")
            except (ValueError, KeyError, TypeError):
                return None
    return None


def run_contrast(args: argparse.Namespace) -> int:
    """``--contrast DIR --metric M``: ablate the top K separating features of a contrast report
    on both of its sets (:mod:`cltrace.steering.ablation`); DIR/ablation.json."""
    import json
    import sys

    from ..batch.store import Store
    from ..contrast.report import REPORT, load_sets
    from ..steering.ablation import FILE, AblationSettings, ablation_json, select_features
    from ._common import messenger

    if args.prompts is not None:
        raise UsageError("give --prompts SET or --contrast DIR, not both")
    if args.out is not None:
        raise UsageError(f"--contrast writes {FILE} into its folder: --out is for --prompts SET")
    if args.metric is None:
        raise UsageError("--contrast DIR needs --metric M (what the ablation should move)")
    settings = from_args(AblationSettings, args).check()
    check_set_args(args)
    store = Store(args.contrast)
    raw = store.get(REPORT)
    if raw is None:
        raise UsageError(f"--contrast {args.contrast}: no {REPORT} (make one with cltrace contrast A B --out DIR)")
    try:
        report = json.loads(raw)
    except ValueError:
        raise UsageError(f"--contrast {args.contrast}/{REPORT}: not JSON") from None
    names, sets = load_sets(store)
    if not all(sets):
        raise UsageError(f"--contrast {args.contrast}: set {names[sets.index([])]!r} has no prompts")
    by = report.get("settings", {}).get("by", "activation")
    features, note = select_features(report, settings)
    ivs = ablation_interventions(features, settings.op) + list(args.features or [])
    say = messenger(args.quiet)
    if note:
        print(f"note: {note}")
    print(f"intervening on {len(features)} feature(s) of {store.location}/{REPORT} (ranked by {by}): "
          + ", ".join(f"L{f['layer']} #{f['feature']} (rank {f['rank']})" for f in features))
    results, synthetic, name = measure_sets(args, sets, ivs, say)
    traced = traced_model(store, sets)
    if traced is not None and traced != name:
        print(f"warning: {args.contrast} was traced with model {traced!r}, this run loaded {name!r} "
              f"(give --model {traced} and its --transcoders)", file=sys.stderr)
    print(f"metric {args.metric.text} ({args.mode} mode), interventions: " + ", ".join(results[0].interventions))
    for set_name, res in zip(names, results):
        print(f"set {set_name!r} ({res.summary.n} prompts):")
        print_result(res, "  ", rows=res.summary.n <= 20)
    store.put(FILE, ablation_json(names, results, features, settings.op, note, by))
    print(f"wrote {store.location}/{FILE}; the report page shows it: cltrace serve {args.contrast}  (page /contrast.html)")
    if synthetic:
        print("note: SYNTHETIC dictionaries (not trained): their features have no learned meaning")
    return 0
