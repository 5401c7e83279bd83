"""One feature page (the reference's JSON format) and its automatic label, from the scan state.

Page fields (what circuit-tracer's viewer and Neuronpedia read): ``index`` (the feature's
index in its layer), ``examples_quantiles`` (groups of examples: "Top activations", then the
uniform sample split by its own activation quantiles, highest first, e.g. "Quantile 75-100%"),
each example ``{tokens, tokens_acts_list, train_token_ind, is_repeated_datapoint}`` (the window
around the example token, the feature's activation on every token of it, the index of the
example token in it, and whether that token was already shown higher on the page),
``top_logits``/``bottom_logits`` (token strings), ``act_min``/``act_max``, ``quantile_values``
(100 percentiles), ``histogram`` (counts in 32 equal bins over [act_min, act_max]),
``activation_frequency`` (firings / tokens scanned), ``transcoder_id`` (the set's id, as the
graph's ``transcoder_list``: a string circuit-tracer 0.5.0's ``frontend/feature_models.Model``
requires, though its viewer never reads it). cltrace adds ``layer``, ``label``,
``label_examples`` (how many top examples the label's tokens are counted over: the "Top
activations" group, ``min(top_k, firings)``) and ``top_logit_score`` (how many standard
deviations of the feature's logits over the vocabulary its top logit lies above their mean,
:mod:`.logits`; null if not finite).

The label (the graph node's ``clerp``): the one or two most frequent tokens among the top
examples, then, only when the most promoted token stands out (``top_logit_score >=``
:data:`LOGIT_LABEL_MIN_SCORE`), that token: ``"Paris"/" France" → " Paris"``, or
``"Paris"/" France"``. Most features' top logit is not a token they promote more than the
rest of the vocabulary's tail, only the largest of 262k roughly normal values (about 4.6
standard deviations above the mean on average for a normal sample of that size); the
threshold keeps the arrow for tokens well beyond that.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from .selection import EMPTY_TOK
from .state import LayerState, linear_histogram, quantile_values

N_QUANTILES = 4  # groups the sample is split into
HIST_BINS_PAGE = 32
# The one threshold on ``top_logit_score`` for a label to show its top logit (module doc).
# Measured on Gemma 3 270M (262,144 tokens) and its starter set (18 x 2048 features):
# - noise: 8,704 random directions score 4.6-4.8 at the median, at most 6.7; the starter
#   features alike (median 4.74, 99th percentile 6.63): for 99 % of them the top logit is
#   the largest of 262k draws, not a token they promote (" Helsing", "ufth", "FileDialog" for
#   the most influential features at " capital" of "The capital of France is", 3.7-6.2);
# - junk top tokens ("しも", " \u200b\u200b", "orship") reach 7.6; from about 8 up the top
#   tokens are coherent (" but"/"but"/" BUT", " than", "<h3>"), except a few layer 0-1
#   features whose decoders share the direction of the "s"/"的"/"<bos>" rows;
# - a direction along a token's own unembedding row scores 11.7 at the median.
# 10 keeps a margin above the junk for sets 10x larger (the noise's maximum grows with the
# number of features): 23 of the 36,755 starter features that fired keep a logit half
# (116 at 8, 260 at 7).
LOGIT_LABEL_MIN_SCORE = 10.0


def _r(x: float) -> float:
    return round(float(x), 5)


def quote(token: str) -> str:
    """A token as the label shows it: JSON-quoted (newlines and quotes escaped)."""
    return json.dumps(token, ensure_ascii=False)


def shows_logit(score: Optional[float]) -> bool:
    """Whether a label shows the top logit: its score reaches :data:`LOGIT_LABEL_MIN_SCORE`."""
    return score is not None and not math.isnan(score) and score >= LOGIT_LABEL_MIN_SCORE


def auto_label(top_tokens: Sequence[str], top_logits: Sequence[str],
               top_logit_score: Optional[float] = None) -> str:
    """``"a"/"b" → "c"``: the (up to) two most frequent example tokens, first seen first among
    equals, then, when :func:`shows_logit` of its score, the most promoted token (no score:
    never). Non-empty whenever there is one example token."""
    counts = Counter(top_tokens)
    order = {t: i for i, t in reversed(list(enumerate(top_tokens)))}
    best = sorted(counts, key=lambda t: (-counts[t], order[t]))[:2]
    label = "/".join(quote(t) for t in best)
    if top_logits and shows_logit(top_logit_score):
        label = f"{label} → {quote(top_logits[0])}" if label else f"→ {quote(top_logits[0])}"
    return label


def _example(t: int, act: float, win: np.ndarray, flat_rows: Tensor, ctx: int, window: int,
             tokstr: dict[int, str], repeated: bool) -> dict:
    row_start = (t // ctx) * ctx
    start, end = max(row_start, t - window), min(row_start + ctx - 1, t + window)
    acts = np.round(win[start - (t - window): end - (t - window) + 1].astype(np.float64), 5).tolist()
    centre = t - start
    acts[centre] = _r(act)  # the exact activation of the scan (the window is float16)
    tokens = [tokstr[i] for i in flat_rows[start:end + 1].tolist()]
    return {"tokens": tokens, "tokens_acts_list": acts, "train_token_ind": centre,
            "is_repeated_datapoint": repeated}


def example_groups(st: LayerState, f: int, win: np.ndarray, flat_rows: Tensor, ctx: int,
                   window: int, tokstr: dict[int, str]) -> list[dict]:
    """``examples_quantiles`` of feature ``f`` (``win [K + S, 2w + 1]`` its windows)."""
    K = st.top.k
    seen: set[int] = set()
    groups = []

    def make(slots: Sequence[int], toks: list, acts: list, offset: int) -> list[dict]:
        out = []
        for j in slots:
            t = toks[j]
            out.append(_example(t, acts[j], win[offset + j], flat_rows, ctx, window, tokstr, t in seen))
            seen.add(t)
        return out

    t_tok, t_act = st.top.tok[f].tolist(), st.top.act[f].tolist()
    top_filled = [j for j in range(K) if t_tok[j] != EMPTY_TOK]
    groups.append({"quantile_name": "Top activations", "examples": make(top_filled, t_tok, t_act, 0)})
    s_tok, s_act = st.sample.tok[f].tolist(), st.sample.act[f].tolist()
    filled = [j for j in range(st.sample.k) if s_tok[j] != EMPTY_TOK]
    filled.sort(key=lambda j: (s_act[j], s_tok[j]))  # ascending activation
    chunks = np.array_split(np.array(filled, dtype=np.int64), min(N_QUANTILES, max(len(filled), 1)))
    n = len(chunks)
    for q in reversed(range(n)):  # highest quantile first, each highest activation first
        if len(chunks[q]) == 0:
            continue
        lo, hi = round(100 * q / n), round(100 * (q + 1) / n)
        groups.append({"quantile_name": f"Quantile {lo}-{hi}%",
                       "examples": make(chunks[q][::-1].tolist(), s_tok, s_act, K)})
    return groups


def feature_page(layer: int, f: int, st: LayerState, win: np.ndarray, flat_rows: Tensor,
                 ctx: int, window: int, n_tokens: int, tokstr: dict[int, str],
                 top_ids: Optional[Tensor], bottom_ids: Optional[Tensor], transcoder_id: str = "",
                 top_logit_score: Optional[float] = None) -> dict:
    """The page of feature ``f`` of ``layer`` (which fired at least once)."""
    act_min, act_max = float(st.act_min[f]), float(st.act_max[f])
    groups = example_groups(st, f, win, flat_rows, ctx, window, tokstr)
    top_logits = [tokstr[int(i)] for i in top_ids] if top_ids is not None else []
    bottom_logits = [tokstr[int(i)] for i in bottom_ids] if bottom_ids is not None else []
    top_tokens = [ex["tokens"][ex["train_token_ind"]] for ex in groups[0]["examples"]]
    # the label decides on the score the page states (rounded), so the two always agree
    score = top_logit_score if top_logit_score is None or not math.isfinite(top_logit_score) \
        else round(float(top_logit_score), 3)
    return {
        "transcoder_id": transcoder_id, "index": f, "layer": layer,
        "label": auto_label(top_tokens, top_logits, score),
        "label_examples": len(top_tokens),
        "top_logit_score": score if score is not None and math.isfinite(score) else None,
        "examples_quantiles": groups,
        "top_logits": top_logits, "bottom_logits": bottom_logits,
        "act_min": _r(act_min), "act_max": _r(act_max),
        "quantile_values": [_r(v) for v in quantile_values(st.hist[f], act_min, act_max)],
        "histogram": linear_histogram(st.hist[f], act_min, act_max, HIST_BINS_PAGE),
        "activation_frequency": float(int(st.count[f]) / max(n_tokens, 1)),
    }


def page_token_ids(st: LayerState, f: int, flat_rows: Tensor, ctx: int, window: int) -> list[int]:
    """Token ids the page of ``f`` shows (to decode them all at once)."""
    out = []
    for tok in (st.top.tok[f], st.sample.tok[f]):
        for t in tok.tolist():
            if t == EMPTY_TOK:
                continue
            row_start = (t // ctx) * ctx
            start, end = max(row_start, t - window), min(row_start + ctx - 1, t + window)
            out += flat_rows[start:end + 1].tolist()
    return out
