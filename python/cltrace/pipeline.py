"""One prompt, end to end: tokenize, attribute, prune, score and export its graph.

:func:`trace_prompt` is the single implementation behind ``cltrace attribute`` and the batch
workers (:mod:`cltrace.batch.worker`), so a graph traced either way is the same file. It sits
above the stages it strings together (attribution, graph, export, features) and below the
commands and the batch runner. The method is Ameisen et al. 2025, "Circuit Tracing" (see
:mod:`cltrace.attribution`).
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .attention.settings import QKSettings
from .attribution.settings import AttributionSettings
from .errors import UsageError
from .export.neuronpedia import check_slug
from .graph.pruning import PruneSettings

FORMATS = ("json", "dot", "svg", "png", "pt")
IMAGE_PLACEHOLDER = "<start_of_image>"  # where an image goes in a Gemma 3 prompt (its processor's)


def image_prompt_text(text: str, n_images: int) -> str:
    """The prompt text for ``n_images`` images: as given when it holds one
    ``<start_of_image>`` per image; with no placeholder, one per image prepended; any other
    count is a UsageError (before any model loads)."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n_images and n == 0:
        return IMAGE_PLACEHOLDER * n_images + " " + text
    if n != n_images:
        raise UsageError(f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) for {n_images} "
                         f"image(s) (--image): put one {IMAGE_PLACEHOLDER} where each image goes, "
                         "or none to have the images first")
    return text


def slugify(text: str) -> str:
    """A file-name-safe graph name from a prompt: lower-case words joined by '-', 48 chars."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-")
    return slug or "graph"


def parse_formats(text: str) -> tuple[str, ...]:
    """'json,dot' -> ('json', 'dot'), each checked against FORMATS."""
    out = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise UsageError(f"--format {text!r}: choose among {', '.join(FORMATS)}")
    return out


@dataclass(frozen=True)
class TraceSettings:
    """Everything that decides a prompt's outputs, shared by every prompt of a run: what is
    attributed, how it is pruned, which files are written."""

    attribution: AttributionSettings = AttributionSettings()
    pruning: PruneSettings = PruneSettings()
    formats: tuple = ("json",)
    attention: QKSettings = QKSettings()  # --qk: head loadings and QK traces in the JSON

    def check(self) -> "TraceSettings":
        """Raise a UsageError naming the option of a bad value."""
        self.attribution.check()
        self.pruning.check()
        self.attention.check()
        parse_formats(",".join(self.formats))
        return self


@dataclass(frozen=True)
class PromptSpec:
    """One prompt to trace: its text, graph name, explicit targets and chat wrapping, or a
    conversation (``messages``, which then replaces ``prompt`` and ``chat``; ``prompt`` holds
    its last user message, for tables). ``label`` and ``pair`` are carried for the commands
    that compare groups of prompts (a class name; an id shared by the prompts of a matched
    pair); tracing ignores them."""

    prompt: str
    slug: str
    targets: tuple = ()  # tokens and (a, b) logit differences; empty: the salient logits
    chat: bool = False
    messages: tuple = ()  # ((role, content), ...) checked by cltrace.models.conversation.check_messages
    label: Optional[str] = None
    pair: Optional[str] = None
    images: tuple = ()  # image files, one per <start_of_image> of ``prompt`` (a multimodal model)


@dataclass
class TraceRecord:
    """What tracing one prompt produced (the graph and its pruning stay in memory)."""

    slug: str
    graph: object  # cltrace.Graph, unpruned
    result: object  # cltrace.graph.PruneResult
    scores: object  # cltrace.graph.GraphScores
    times: dict  # seconds per phase
    written: list = field(default_factory=list)  # paths, in write order
    warnings: list = field(default_factory=list)
    attention: object = None  # cltrace.attention.AttentionReport, with --qk

    def summary(self) -> dict:
        """Counts and scores as plain JSON values (one manifest line's numbers)."""
        g, r = self.graph, self.result
        return {"n_nodes": g.n_nodes, "n_features": g.n_features, "n_logits": g.n_logits,
                "n_edges": int((g.edges != 0).sum()), "kept_nodes": int(r.node_mask.sum()),
                "kept_edges": int(r.edge_mask.sum()),
                "scores": {"replacement": float(self.scores.replacement),
                           "completeness": float(self.scores.completeness)},
                "targets": [[l, float(p)] for l, p in zip(g.logit_labels, g.logit_probs.tolist())]}

    def kept_features(self) -> list:
        """[layer, feature, influence] of each feature kept by pruning, influence summed over
        its positions, most influential first."""
        g, r = self.graph, self.result
        feats = g.features.tolist()  # [n_features, 3]: layer, pos, feature
        infl = r.influence.tolist()
        mask = r.node_mask.tolist()
        acc: dict = {}
        for i, (layer, _pos, feat) in enumerate(feats):
            if mask[i]:
                acc[(layer, feat)] = acc.get((layer, feat), 0.0) + infl[i]
        return sorted(([l, f, v] for (l, f), v in acc.items()), key=lambda x: (-x[2], x[0], x[1]))


def trace_prompt(rm, tokenizer, spec: PromptSpec, settings: TraceSettings, out: Path, *,
                 verbose: bool = False, times: Optional[dict] = None, pages=None,
                 say: Callable[..., None] = lambda *a: None) -> TraceRecord:
    """Attribute ``spec.prompt`` with the replacement model ``rm`` (``settings.attribution``),
    prune (``settings.pruning``) and score the graph, explain its attention if
    ``settings.attention.qk`` (:func:`cltrace.attention.explain_attention`, into the JSON), and
    write ``settings.formats`` as ``out/{slug}.*`` (json adds ``out/graph-metadata.json``).
    With ``pages`` (:class:`cltrace.features.FeaturePages` of ``rm``'s transcoders) the JSON's
    feature nodes carry their labels and the pages of the kept features go to
    ``out/features/`` (the ``./data/features`` scan both viewers read).

    With ``spec.images`` (``rm`` built by :meth:`~cltrace.replacement.ReplacementModel.from_multimodal`)
    the prompt holds one ``<start_of_image>`` per image (:func:`image_prompt_text`); the
    images are copied beside the JSON and described in its ``metadata.info.images``
    (:mod:`cltrace.export.images`).

    ``times`` (a dict) receives the seconds per phase, after what it already holds. Raises
    UsageError for a bad prompt (empty, too long, a target that is not one token)."""
    from .attribution import attribute
    from .export import render, write_neuronpedia
    from .graph import graph_scores, prune
    from .models import prompt_tokens

    if not spec.prompt.strip():
        raise UsageError("the prompt is empty")
    check_slug(spec.slug)
    times = {} if times is None else times
    prompt, ids = prompt_tokens(tokenizer, spec.prompt, spec.chat, spec.messages, spec.images,
                                getattr(rm, "images", None))  # ids: an ImagePrompt with images
    say("attributing ...")
    graph = attribute(ids, rm, **dataclasses.asdict(settings.attribution), prompt_text=prompt,
                      targets=list(spec.targets) or None, verbose=verbose, timings=times)
    if spec.images:
        from .export.images import image_copy_name, image_entries

        names = [image_copy_name(spec.slug, i, p) for i, p in enumerate(spec.images)]
        graph.info["images"] = image_entries(ids.image_groups[0], graph.token_strs, names)

    t0 = time.perf_counter()
    result = prune(graph, settings.pruning.node_threshold, settings.pruning.edge_threshold)
    scores = graph_scores(graph, result)
    times["prune"] = time.perf_counter() - t0

    record = TraceRecord(spec.slug, graph, result, scores, times)
    if settings.attention.qk:
        from .attention import explain_attention

        say("explaining attention (head loadings, QK traces) ...")
        t0 = time.perf_counter()
        record.attention = explain_attention(rm, graph, result, settings.attention,
                                             targets=list(spec.targets) or None,
                                             prompt=ids if spec.images else None)
        times["attention"] = time.perf_counter() - t0  # its forward, head loadings and QK traces

    t0 = time.perf_counter()
    slug, formats = spec.slug, settings.formats
    if "json" in formats and spec.images:
        from .export.images import copy_images

        record.written += copy_images(spec.images, out, slug)
    if "json" in formats:
        labelled = {}
        if pages is not None:
            from .features import pages_for_graph

            kept = graph.features[result.node_mask[:graph.n_features]].tolist()  # [k, 3]
            wanted = {(int(l), int(f)) for l, _, f in kept}
            if record.attention is not None:  # and the QK contributors' pages
                wanted |= {(c.layer, c.feature) for c in record.attention.contributors.values()
                           if c.kind == "feature"}
            info = pages_for_graph(pages, sorted(wanted), out)
            labelled = dict(labels=info["clerps"], scan=info["scan"])
        record.written.append(write_neuronpedia(graph, out, slug, result, attention=record.attention,
                                                **labelled))
    for fmt in ("dot", "svg", "png"):
        if fmt in formats:
            try:
                record.written.append(render(graph, out / f"{slug}.{fmt}", fmt=fmt, result=result))
            except RuntimeError as e:  # no Graphviz for png: say so, keep the other outputs
                record.warnings.append(str(e))
    if "pt" in formats:
        path = out / f"{slug}.graph.safetensors"
        graph.save(path)
        record.written.append(path)
    times["export"] = time.perf_counter() - t0
    return record
