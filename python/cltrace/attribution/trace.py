"""Attribution graphs: the direct effects between features, errors, tokens and logits.

For a batch of B targets (logit directions or feature pre-activations) the linearised backward
of the frozen replacement model (:mod:`cltrace.frozen`) yields, layer by layer, the gradient of every
target w.r.t. that layer's MLP output; the compiled ``attribution_contract`` turns it into the
edges from every feature decoding into the layer (each decoder row read once per batch), error
nodes are a dot with the error vector, and token nodes with the embedding. So

    A[t, s] = a_s · Σ_{ℓ_s ≤ ℓ < ℓ_t} W_dec[s→ℓ] · J(ℓ→t) · W_enc[t]

(Ameisen et al. 2025, https://transformer-circuits.pub/2025/attribution-graphs/methods.html),
without replicating the forward pass. Which feature rows are computed, and in which order, is
:mod:`.visit`; where the rows are kept, :mod:`.stores`; this module runs the prompt, picks the
targets and assembles the :class:`Graph`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..frozen.model import Seeds
from ..graph.graph import Graph
from ..replacement.model import ReplacementModel
from ..replacement.state import ReplacementState
from .rows import EdgeRows
from .settings import AttributionSettings
from .stores import BoundedStore, make_store
from .targets import TargetSpec, default_targets
from .visit import visit


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero inside the block, then restore the caller's setting.

    Gradients far from their seed underflow to denormals, which make CPU arithmetic ~10x
    slower; flushing them changes edges by < 1e-38. torch has no getter for the setting, so
    whether it was on is read from the arithmetic itself (a denormal times one is zero)."""
    was_on = float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def attribute(prompt, model: ReplacementModel, *,
              max_feature_nodes: Optional[int] = AttributionSettings.max_feature_nodes,
              batch_size: int = AttributionSettings.batch_size,
              max_n_logits: int = AttributionSettings.max_n_logits,
              desired_logit_prob: float = AttributionSettings.desired_logit_prob,
              targets: Optional[Sequence[TargetSpec]] = None, prompt_text: Optional[str] = None,
              update_interval: int = 4, verbose: bool = False,
              timings: Optional[dict] = None, bounded: Optional[bool] = None,
              dense_limit_bytes: int = 1 << 30) -> Graph:
    """The unpruned attribution graph of ``prompt`` (text, token ids, or an image prompt of
    ``model.images.prompt``) for ``model``.

    The settings are those of :class:`AttributionSettings` (defaults there):
    ``max_feature_nodes`` (None: every active feature) features are visited, chosen by
    estimated influence (:mod:`.visit`) when fewer than the active ones; ``targets``: token
    ids/texts, ``(a, b)`` logit differences or :class:`~.targets.LogitTarget`s, by default the salient
    next-token logits. ``prompt_text``: the text the graph records when ``prompt`` is token ids
    (default: the decoded tokens). ``timings`` (a dict), if given, receives the seconds spent
    per phase.

    The rows live in the dense store, or in the memory-bounded one when the dense rows would
    exceed ``dense_limit_bytes`` (``bounded`` forces the choice); both give the same graph
    (:mod:`.stores`)."""
    settings = AttributionSettings(max_feature_nodes, batch_size, max_n_logits,
                                   desired_logit_prob).check()
    if isinstance(prompt, str):
        prompt_text = prompt
    with flush_denormals():
        return _attribute(prompt, model, settings, targets, prompt_text, update_interval, verbose,
                          timings, bounded, dense_limit_bytes)


def _attribute(prompt, model, settings: AttributionSettings, targets, prompt_text,
               update_interval, verbose, timings, bounded, dense_limit_bytes) -> Graph:
    times = timings if timings is not None else {}
    t0 = time.perf_counter()
    state = model.run(prompt, all_logits=False)
    times["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    decode = _decoder(model)
    logit_targets = default_targets(state.logits[-1], max_n_logits=settings.max_n_logits,
                                    desired_logit_prob=settings.desired_logit_prob,
                                    direction=state.frozen.logit_direction, decode=decode,
                                    targets=targets, tokenizer=model.tokenizer)
    rows_fn = EdgeRows(state)
    af = state.active_features()
    n_feat, n_logits = rows_fn.n_features, len(logit_targets)
    n_visit = n_feat if settings.max_feature_nodes is None else min(settings.max_feature_nodes, n_feat)
    last = state.n_pos - 1
    logit_seeds = Seeds(torch.full((n_logits,), state.n_layers), torch.full((n_logits,), last),
                        torch.stack([t.vec for t in logit_targets]).to(state.frozen.dtype))
    times["logits"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    logit_weights = torch.tensor([t.weight for t in logit_targets], dtype=torch.float64)
    store = make_store(state, rows_fn, af, n_visit, n_logits, settings.batch_size,
                       dense_limit_bytes, bounded)
    bar = tqdm(total=n_visit, desc="feature rows", unit="feat", disable=not verbose)
    edges, selected = visit(state, rows_fn, af, logit_seeds, logit_weights, n_visit,
                            settings.batch_size, update_interval, store, bar.update)
    bar.close()
    times["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    graph = _assemble(state, model, prompt_text, af, logit_targets, edges, selected, decode)
    # keys in the order graphs have always recorded them (the JSON stays byte-identical)
    graph.settings = {"max_n_logits": settings.max_n_logits,
                      "desired_logit_prob": settings.desired_logit_prob,
                      "max_feature_nodes": settings.max_feature_nodes,
                      "batch_size": settings.batch_size,
                      "n_active_features": n_feat, "skip_positions": state.skip_positions,
                      "bounded": isinstance(store, BoundedStore)}
    times["assemble"] = time.perf_counter() - t0
    return graph


def _decoder(model: ReplacementModel):
    tok = model.tokenizer
    if tok is None:
        return lambda t: f"<{int(t)}>"
    return lambda t: tok.decode([int(t)])


def _assemble(state: ReplacementState, model: ReplacementModel, prompt_text: Optional[str], af,
              logit_targets, edges: Tensor, selected: Tensor, decode) -> Graph:
    """The Graph of the visited features (rows: features, then logits); the tokens are named
    by the state's labels when it has them (image prompts: ``<img r,c>`` for soft tokens)."""
    n_logits = len(logit_targets)
    n_sel = selected.numel()
    logit_start = n_sel + (state.n_layers + 1) * state.n_pos
    tokens = state.tokens.cpu()
    tcs = state.transcoders
    names = list(state.labels) if state.labels is not None else [decode(t) for t in tokens]
    return Graph(
        prompt=prompt_text if prompt_text is not None else "".join(names),
        tokens=tokens, token_strs=names, n_layers=state.n_layers,
        features=torch.stack([af.layer[selected], af.pos[selected], af.feature[selected]], 1).cpu(),
        activations=af.value[selected].float().cpu(),
        logit_tokens=torch.tensor([t.token_id for t in logit_targets], dtype=torch.int64),
        logit_labels=[t.label for t in logit_targets],
        logit_probs=torch.tensor([t.weight for t in logit_targets], dtype=torch.float32),
        edges=edges, edge_targets=torch.cat([torch.arange(n_sel), torch.arange(logit_start, logit_start + n_logits)]),
        model_name=model.model_name or tcs.model_name,
        scan=tcs.info.get("scan") or tcs.info.get("set_id") or tcs.model_name,
        transcoder_list=[tcs.info["set_id"]] if tcs.info.get("set_id") else [],
        info=dict(tcs.info.get("graph_info", {})),
    )
