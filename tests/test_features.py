"""Feature pages (``cltrace features``): exact state against brute force, shards, resume, the
page format, labels, and the command's errors. Tiny random Gemma 3; one test on the real 270M."""
from __future__ import annotations

import copy
import gzip
import json
import math
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cltrace.features import FeaturePages, FeatureSettings, FeatureState, build_pages, cantor, merge_states, pages_for_graph, uncantor
from cltrace.features.logits import feature_logits, top_bottom_logits, unembedding
from cltrace.features.pages import LOGIT_LABEL_MIN_SCORE, auto_label
from cltrace.features.scan import encode_batch, layer_encoders, scan, token_ids
from cltrace.features.selection import EMPTY_TOK, sample_keys
from cltrace.features.state import HIST_BINS, quantile_values
from cltrace.models.activations import ActivationSource
from support.tiny_gemma import tiny_gemma, tiny_model_and_set
from support.transcoders import random_transcoders

BOS, VOCAB, CTX, LAYERS = 2, 300, 24, [0, 1, 2]
WORDS = [f"w{i}" for i in range(60)]  # tokenizer vocabulary beyond the 4 specials


class CharTok:
    """Stand-in tokenizer for the API tests: token i is shown as 't{i}'."""

    bos_token_id = BOS

    def batch_decode(self, ids):
        return [f"t{i[0]}" for i in ids]


@pytest.fixture(scope="module")
def setup():
    """(3-layer tiny model, 20 rows of CTX tokens, a 40-wide PLT set); row 3 holds a document
    boundary (<bos> at position 9): no activations there."""
    return tiny_model_and_set(20, VOCAB, CTX, BOS, boundaries=[(3, 9)])


def dense_acts(model, rows, ts):
    """Brute force: every (token, feature) activation, dense. ``{L: [T, d_sae]}``, tok [T]."""
    src = ActivationSource(model, rows, LAYERS, BOS, batch_rows=rows.shape[0], outputs=False)
    idx = torch.arange(rows.shape[0])
    x = src.read(idx).x
    out = {}
    for i, L in enumerate(LAYERS):
        tc = ts.layers[L]
        z = x[i] @ tc.W_enc + tc.b_enc
        out[L] = torch.where(z > tc.threshold, z, torch.zeros(()))
    return out, token_ids(rows, idx, BOS)


def run_scan(model, rows, ts, row_ids=None, batch_rows=3, top_k=5, n_samples=8):
    state = FeatureState.empty({L: 40 for L in LAYERS}, CTX, top_k, n_samples, seed=7)
    return scan(model, rows, layer_encoders(ts, LAYERS), state, bos=BOS, row_ids=row_ids,
                batch_rows=batch_rows, bar=False)


def test_state_equals_brute_force(setup):
    model, rows, ts = setup
    state = run_scan(model, rows, ts)
    dense, tok = dense_acts(model, rows, ts)
    assert state.n_tokens == tok.numel() == int((rows != BOS).sum())
    for L in LAYERS:
        st, A = state.layers[L], dense[L]
        assert torch.equal(st.count, (A > 0).sum(0))
        for f in range(40):
            t_f, a_f = tok[A[:, f] > 0], A[A[:, f] > 0, f]
            if a_f.numel() == 0:
                assert int(st.top.tok[f, 0]) == EMPTY_TOK
                continue
            # the scan's batches against one dense pass: measured bit-equal (also one-thread and
            # with CLTRACE_TINY_MODEL=cltrace); 8 float32 ulps leave room for another BLAS's
            # summation order (was rtol 1e-5)
            torch.testing.assert_close(st.act_max[f], a_f.max(), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(st.act_min[f], a_f.min(), rtol=1e-6, atol=1e-7)
            # top-K: largest activations, ties by token id
            order = sorted(range(a_f.numel()), key=lambda j: (-float(a_f[j]), int(t_f[j])))[:5]
            assert st.top.tok[f, :len(order)].tolist() == [int(t_f[j]) for j in order]
            torch.testing.assert_close(st.top.act[f, :len(order)], a_f[order], rtol=1e-6, atol=1e-7)
            # sample: the smallest hash keys, computed directly
            keys = sample_keys(7, L, torch.full_like(t_f, f), t_f)
            want = sorted(range(t_f.numel()), key=lambda j: (float(keys[j]), int(t_f[j])))[:8]
            assert st.sample.tok[f, :len(want)].tolist() == [int(t_f[j]) for j in want]
            # log histogram: a direct count (bin = floor(12 (log2 a + 6)), end bins take the rest)
            b = np.clip(np.floor((np.log2(st_acts := a_f.double().numpy()) + 6) * 12), 0, HIST_BINS - 1)
            assert np.array_equal(st.hist[f].numpy(), np.bincount(b.astype(int), minlength=HIST_BINS))
            # quantile values: within one bin (a factor 2^(1/12)) of the exact quantiles
            qv = quantile_values(st.hist[f], float(st.act_min[f]), float(st.act_max[f]))
            exact = np.quantile(st_acts, [0.25, 0.5, 0.75, 1.0], method="inverted_cdf")
            for q, e in zip([qv[24], qv[49], qv[74], qv[99]], exact):
                assert abs(math.log2(q / e)) <= 1 / 12 + 1e-9, (L, f, q, e)


def test_shards_merge_to_one_pass(setup):
    model, rows, ts = setup
    whole = run_scan(model, rows, ts)
    shards = [run_scan(model, rows, ts, row_ids=torch.tensor(ids), batch_rows=b)
              for ids, b in [([7, 8, 9, 10, 11, 12, 13], 2), (list(range(7)), 4), (list(range(14, 20)), 5)]]
    merged = merge_states(shards)
    assert merged.n_tokens == whole.n_tokens
    a, b = whole.tensors(), merged.tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(setup, out, batch_rows: int = 3, **kw):
    model, rows, ts = setup
    return build_pages(model, CharTok(), ts, rows, LAYERS, out, bar=False, **kw,
                       settings=FeatureSettings(top_k=5, n_samples=8, seed=7, window=4,
                                                batch_rows=batch_rows))


@pytest.fixture(scope="module")
def built(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("pages") / "out"
    res = _build(setup, out)
    return out, res


def test_resumed_and_repeated_runs_give_identical_files(setup, built, tmp_path):
    out, _ = built
    import cltrace.features.build as build_mod

    real_scan = build_mod.scan

    def interrupted(model, rows, encoders, state, **kw):  # Ctrl-C after 2 checkpointed batches
        def checkpoint(s):
            kw["checkpoint"](s)
            if s.meta["next_batch"] == 2:
                raise KeyboardInterrupt
        return real_scan(model, rows, encoders, state, **{**kw, "checkpoint": checkpoint, "every_s": 0.0})

    build_mod.scan = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            _build(setup, tmp_path / "r")
    finally:
        build_mod.scan = real_scan
    assert (tmp_path / "r" / ".work" / "state.pt").is_file()
    state = FeatureState.load(tmp_path / "r" / ".work" / "state.pt")
    assert state.meta["next_batch"] == 2
    _build(setup, tmp_path / "r", batch_rows=5)  # resumed with the interrupted run's 3 rows a batch
    assert _files(tmp_path / "r") == _files(out)
    with pytest.raises(FileExistsError, match="not empty"):
        _build(setup, tmp_path / "r")


PAGE_SCHEMA = {
    "type": "object",
    "required": ["transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits",
                 "act_min", "act_max", "quantile_values", "histogram", "activation_frequency"],
    "properties": {
        "transcoder_id": {"type": "string"},
        "index": {"type": "integer", "minimum": 0},
        "examples_quantiles": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["quantile_name", "examples"],
            "properties": {"quantile_name": {"type": "string", "minLength": 1},
                           "examples": {"type": "array", "items": {
                               "type": "object",
                               "required": ["tokens", "tokens_acts_list", "train_token_ind", "is_repeated_datapoint"],
                               "properties": {"tokens": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                              "tokens_acts_list": {"type": "array", "items": {"type": "number"}},
                                              "train_token_ind": {"type": "integer", "minimum": 0},
                                              "is_repeated_datapoint": {"type": "boolean"}}}}}}},
        "top_logits": {"type": "array", "items": {"type": "string"}},
        "bottom_logits": {"type": "array", "items": {"type": "string"}},
        "act_min": {"type": "number"}, "act_max": {"type": "number"},
        "quantile_values": {"type": "array", "items": {"type": "number"}, "minItems": 100, "maxItems": 100},
        "histogram": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        "activation_frequency": {"type": "number", "minimum": 0, "maximum": 1},
        # cltrace's own (extra fields: the viewers ignore them)
        "label": {"type": "string", "minLength": 1},
        "label_examples": {"type": "integer", "minimum": 1},
        "top_logit_score": {"type": ["number", "null"]},
    },
}


# --- top/bottom logits and labels against a dense computation ---------------------------------

def dense_logits(model, ts, L, f):
    """The computation logits.py documents, dense and in float64: ``(sum of f's decoder rows *
    (1 + final norm weight)) @ W_U^T``, demeaned over the vocabulary. (token ids most promoted
    first, the logits, (max - mean) / population std)."""
    W_U = model.lm_head.weight.detach().double()
    gain = 1.0 + model.model.norm.weight.detach().double()
    lg = W_U @ (ts.layers[L].W_dec[f].double().sum(0) * gain)
    lg = lg - lg.mean()
    order = torch.argsort(lg, descending=True)
    return order, lg, float(lg.max() / lg.std(correction=0))


def float32_error_bound(model, ts, L, f) -> float:
    """A bound on how far the code's float32 logits can be from the exact ones: the standard
    (m + 1) u sum|a_i b_i| of an m-term float32 dot product (u = 2^-24), m = d_model plus the
    decoder rows summed and the gain multiplied."""
    W = ts.layers[L].W_dec[f].double()  # [n_out, d_model]
    gain = 1.0 + model.model.norm.weight.detach().double()
    m = W.shape[1] + W.shape[0] + 2
    return float(((W.abs().sum(0) * gain.abs()) @ model.lm_head.weight.detach().double().abs().T).max()) * (m + 1) * 2.0 ** -24


def assert_sorted_like(top, bottom, order, lg, bound, n):
    """``top``/``bottom`` (token ids) are the dense sort's first / last ``n``: distinct, and the
    i-th has the i-th largest / smallest exact logit, to twice the float32 error ``bound`` (so
    the ids equal the dense order wherever neighbours differ by more than that: all but
    near-ties, which float32 may order either way; counted, they must be rare)."""
    srt = lg[order]
    for ids, want in ((top, srt[:n]), (bottom, srt.flip(0)[:n])):
        assert len(ids) == len(set(ids)) == n
        assert float((lg[ids] - want).abs().max()) <= 2 * bound, (ids, lg[ids], want)
    exact = [i for i in range(n) if top[i] == int(order[i])] + \
        [i for i in range(n) if bottom[i] == int(order[-1 - i])]
    return len(exact)


def expected_label(top_tokens, top_logit, score):
    """What a label must be: the two most frequent top-example tokens (first seen first among
    equals), then ``→ top logit`` exactly when its score reaches LOGIT_LABEL_MIN_SCORE."""
    first, counts = {}, Counter(top_tokens)
    for i, t in enumerate(top_tokens):
        first.setdefault(t, i)
    act = "/".join(json.dumps(t) for t in sorted(counts, key=lambda t: (-counts[t], first[t]))[:2])
    return act + (f" → {json.dumps(top_logit)}" if score >= LOGIT_LABEL_MIN_SCORE else "")


def check_logits_and_label(page, model, ts, rows, st, L, f, n=10):
    """The page's top/bottom logits, score and label against :func:`dense_logits` and the top
    examples of the scan state ``st`` (itself checked against brute force). Returns the
    score."""
    order, lg, score = dense_logits(model, ts, L, f)
    top = [int(t[1:]) for t in page["top_logits"]]
    bottom = [int(t[1:]) for t in page["bottom_logits"]]
    assert_sorted_like(top, bottom, order, lg, float32_error_bound(model, ts, L, f), n)
    # score: rounded to 3 decimals on the page
    assert abs(page["top_logit_score"] - score) <= 5e-4 + 1e-6 * score, (page["top_logit_score"], score)
    assert abs(score - LOGIT_LABEL_MIN_SCORE) > 1e-3  # which side of the threshold is not rounding
    tok = st.top.tok[f][st.top.tok[f] != EMPTY_TOK]
    flat = rows.flatten()
    top_tokens = [f"t{int(flat[t])}" for t in tok.tolist()]
    assert page["label_examples"] == len(top_tokens) == min(st.top.k, int(st.count[f])) > 0
    assert page["label"] == expected_label(top_tokens, f"t{int(order[0])}", score), (page["label"], score)
    return score


def test_pages_valid_labelled_and_in_every_layout(setup, built):
    import jsonschema

    out, res = built
    model, rows, ts = setup
    state = run_scan(model, rows, ts, batch_rows=3, top_k=5, n_samples=8)
    index = json.loads(gzip.decompress((out / "features" / "index.json.gz").read_bytes()))
    pages = FeaturePages(out)
    n_fired = 0
    for L in LAYERS:
        offsets = index[str(L)]["offsets"]
        assert len(offsets) == 41 and index[str(L)]["filename"] == f"layer_{L}.bin"
        blob = (out / "features" / index[str(L)]["filename"]).read_bytes()
        for f in range(40):
            path = out / "features" / f"{cantor(L, f)}.json"
            fired = int(state.layers[L].count[f]) > 0
            assert path.exists() == fired and bool(pages.label(L, f)) == fired
            if not fired:
                assert offsets[f] == offsets[f + 1] and pages.page(L, f) is None
                assert pages.label_examples(L, f) == 0
                continue
            n_fired += 1
            page = json.loads(path.read_text())
            jsonschema.validate(page, PAGE_SCHEMA)
            rec = blob[offsets[f]:offsets[f + 1]]
            (n,) = struct.unpack("<I", rec[:4])
            assert json.loads(zlib.decompress(rec[4:4 + n])) == page == pages.page(L, f)
            assert page["index"] == f and page["label"] == pages.label(L, f)
            assert pages.label_examples(L, f) == page["label_examples"]
            # random decoders: no top logit stands out of 300, so no label shows one
            assert check_logits_and_label(page, model, ts, rows, state.layers[L], L, f) < LOGIT_LABEL_MIN_SCORE
            assert " → " not in page["label"]
            assert sum(page["histogram"]) == int(state.layers[L].count[f])
            assert page["activation_frequency"] == int(state.layers[L].count[f]) / state.n_tokens
            top = page["examples_quantiles"][0]["examples"]
            assert [e["tokens_acts_list"][e["train_token_ind"]] for e in top] == \
                [round(float(a), 5) for a in state.layers[L].top.act[f, :len(top)]]
            names = [g["quantile_name"] for g in page["examples_quantiles"]]
            assert names[0] == "Top activations" and all(n.startswith("Quantile ") for n in names[1:])
            # quantile groups: the sample sorted by activation, cut into equal consecutive parts
            s_act = state.layers[L].sample.act[f][state.layers[L].sample.tok[f] != EMPTY_TOK]
            want = [[round(float(a), 5) for a in part[::-1]]
                    for part in np.array_split(np.sort(s_act.numpy()), min(4, s_act.numel()))[::-1]]
            got = [[e["tokens_acts_list"][e["train_token_ind"]] for e in g["examples"]]
                   for g in page["examples_quantiles"][1:]]
            assert got == [w for w in want if w]
    assert n_fired == res.n_pages > 0
    assert uncantor(cantor(17, 2047)) == (17, 2047)
    labels = json.loads(gzip.decompress((out / "labels.json.gz").read_bytes()))
    assert labels["format"] == "cltrace.features/2" and pages.current
    for L in LAYERS:
        want = [min(5, int(c)) for c in state.layers[L].count]  # top_k 5; 0: never fired
        assert labels["layers"][str(L)]["label_examples"] == want


OUT_TOKEN = 1  # <eos>: in no row, so its unembedding row can change without changing activations
BIG_VOCAB = 4096  # a noise top logit as Gemma's 262k make it: ~4 SD, not the ~3 of 300 tokens


@pytest.fixture(scope="module")
def aligned(setup, tmp_path_factory):
    """Pages of a tiny model with a 4096-token vocabulary (the rows of ``setup``: tokens < 300)
    where token OUT_TOKEN's unembedding row is 2.5 times a typical row's norm, and in each layer
    the first feature that fires has the decoder ``W_U[OUT_TOKEN] / (1 + w_norm)`` (so its
    direction through the final norm's gain is that row); the other features keep their random
    decoders. (out, rows, model, transcoders, aligned features {layer: feature})."""
    _, rows, _ = setup
    assert not (rows == OUT_TOKEN).any()
    model = tiny_gemma(n_layers=3, vocab=BIG_VOCAB)
    x = ActivationSource(model, rows, LAYERS, BOS, outputs=False).read(torch.arange(6)).x
    ts = random_transcoders(mlp_in=x, d_sae=40, active=0.08)
    state = run_scan(model, rows, ts)
    feats = {L: int(torch.nonzero(state.layers[L].count > 0)[0]) for L in LAYERS}
    with torch.no_grad():
        W_U = model.lm_head.weight
        u = torch.randn(W_U.shape[1], generator=torch.Generator().manual_seed(5))
        W_U[OUT_TOKEN] = 2.5 * W_U.norm(dim=1).median() * u / u.norm()
        gain = 1.0 + model.model.norm.weight
        for L, f in feats.items():
            ts.layers[L].W_dec[f, 0] = W_U[OUT_TOKEN] / gain
    out = tmp_path_factory.mktemp("aligned") / "out"
    build_pages(model, CharTok(), ts, rows, LAYERS, out, bar=False,
                settings=FeatureSettings(top_k=5, n_samples=8, seed=7, window=4, batch_rows=3))
    return out, rows, model, ts, feats


def test_logits_and_labels_of_an_aligned_feature_and_random_ones(aligned):
    """A feature whose decoder writes one unembedding row's direction: its top logit is that
    token, 19 SD out, and its label ends ``→ "t1"``; every other feature's top logit is the
    noise of 4096 (< 7 SD), and its label has no logit half. Every page's logits, score and
    label as the dense computation says."""
    out, rows, model, ts, feats = aligned
    state = run_scan(model, rows, ts)
    pages = FeaturePages(out)
    seen = {True: 0, False: 0}
    for L in LAYERS:
        for f in range(40):
            page = pages.page(L, f)
            if page is None:
                continue
            score = check_logits_and_label(page, model, ts, rows, state.layers[L], L, f)
            is_aligned = f == feats[L]
            assert (score >= LOGIT_LABEL_MIN_SCORE) == is_aligned, (L, f, score)
            assert page["label"].endswith(f' → "t{OUT_TOKEN}"') == is_aligned
            assert page["label"] == pages.label(L, f)
            if is_aligned:
                assert page["top_logits"][0] == f"t{OUT_TOKEN}" and score > 18
            else:
                assert score < 7
            seen[is_aligned] += 1
    assert seen[True] == len(LAYERS) and seen[False] > 10


def test_feature_logits_scores_equal_the_dense_ones(aligned):
    """Unrounded: the closed-form score (mean g.mu, variance g^T C g over the vocabulary) is the
    dense (max - mean) / std of the logits to float rounding; top/bottom ids as sorted."""
    _, _, model, ts, _ = aligned
    U = unembedding(model)
    n_exact = n_all = 0
    for L in LAYERS:
        fl = feature_logits(model, ts, L, torch.arange(40), n=7, chunk=16, unemb=U)
        for f in range(40):
            order, lg, score = dense_logits(model, ts, L, f)
            n_exact += assert_sorted_like(fl.top[f].tolist(), fl.bottom[f].tolist(), order, lg,
                                          float32_error_bound(model, ts, L, f), 7)
            n_all += 14
            # float32 logits and Gram chunks against float64: measured 2.9e-7 relative at most
            assert abs(float(fl.score[f]) - score) <= 1e-6 * score, (L, f, float(fl.score[f]), score)
    assert n_exact >= n_all - 2, (n_exact, n_all)  # near-ties: at most one swapped pair
    top, bottom = top_bottom_logits(model, ts, 1, torch.arange(40), n=7)  # the ids alone
    fl = feature_logits(model, ts, 1, torch.arange(40), n=7, unemb=U)
    assert torch.equal(top, fl.top) and torch.equal(bottom, fl.bottom)
    empty = feature_logits(model, ts, 0, torch.zeros(0, dtype=torch.int64), unemb=U)
    assert empty.top.shape == (0, 10) and empty.score.shape == (0,)
    zero = copy.deepcopy(ts)
    zero.layers[0].W_dec[3] = 0.0  # no direction at all: score 0, no logit in the label
    assert float(feature_logits(model, zero, 0, torch.tensor([3]), unemb=U).score[0]) == 0.0


def test_auto_label_threshold():
    """The logit half appears exactly from LOGIT_LABEL_MIN_SCORE up (no score: never)."""
    k = LOGIT_LABEL_MIN_SCORE
    toks = [" a", "b", " a", "c", "b", "\n"]
    assert auto_label(toks, [" x"], k) == '" a"/"b" → " x"'
    assert auto_label(toks, [" x"], math.inf) == '" a"/"b" → " x"'
    for score in (math.nextafter(k, 0.0), None, math.nan, 0.0):
        assert auto_label(toks, [" x"], score) == '" a"/"b"'
    assert auto_label(["\n", "q"], [], 100.0) == '"\\n"/"q"'
    assert auto_label([], [" x"], k) == '→ " x"' and auto_label([], [" x"], 1.0) == ""


def test_page_examples_recompute_through_the_model(setup, built):
    """A page's top example (centre and window), recomputed by running its row alone through
    the model and the encoder, gives the stated activations."""
    out, _ = built
    model, rows, ts = setup
    state = run_scan(model, rows, ts, batch_rows=3, top_k=5, n_samples=8)
    pages, enc = FeaturePages(out), layer_encoders(ts, LAYERS)
    checked = 0
    for L in LAYERS:
        for f in (0, 13, 27):
            page = pages.page(L, f)
            if page is None:
                continue
            t = int(state.layers[L].top.tok[f, 0])
            row, pos = divmod(t, CTX)
            idx = torch.tensor([row])
            x = ActivationSource(model, rows, LAYERS, BOS, outputs=False).read(idx).x
            tok = token_ids(rows, idx, BOS)
            acts = {}
            for LL, r, ff, a in encode_batch(enc, x):
                if LL == L:
                    acts.update({int(tok[i]) % CTX: float(v) for i, fi, v in zip(r, ff, a) if fi == f})
            ex = page["examples_quantiles"][0]["examples"][0]
            start, end = max(0, pos - 4), min(CTX - 1, pos + 4)
            assert ex["tokens"] == [f"t{int(i)}" for i in rows[row, start:end + 1]]
            assert ex["train_token_ind"] == pos - start
            want = [acts.get(p, 0.0) for p in range(start, end + 1)]
            # the window is float16: round-to-nearest is within 2^-11 = 4.9e-4 of the value
            # (measured 4.3e-4 rel, 8.6e-4 abs at 4.1), then 5 decimals (5e-6); was 2e-3 / 2e-3
            np.testing.assert_allclose(ex["tokens_acts_list"], want, rtol=6e-4, atol=1e-5)
            # the centre is the scan's float32 value to 5 decimals (5e-6) recomputed on one row
            # (measured 4.1e-6 in all; was rel 1e-4, abs 1e-5)
            assert abs(ex["tokens_acts_list"][pos - start] - acts[pos]) <= 5e-6 + 1e-6 * abs(acts[pos])
            checked += 1
    assert checked >= 3


def test_pages_for_graph(built, tmp_path):
    out, _ = built
    pages = FeaturePages(out)
    fired = [(L, f) for L in LAYERS for f in range(40) if pages.label(L, f)][:3]
    never = [(L, f) for L in LAYERS for f in range(40) if not pages.label(L, f)][:1]
    res = pages_for_graph(pages, fired + never, tmp_path / "graph")
    assert res["scan"] == "./data/features"
    assert res["clerps"] == {k: pages.label(*k) for k in fired}
    for L, f in fired:
        assert json.loads((tmp_path / "graph" / "features" / f"{cantor(L, f)}.json").read_text()) == pages.page(L, f)
    assert len(list((tmp_path / "graph" / "features").iterdir())) == len(fired)


def test_older_format_is_read_and_the_starter_cache_rebuilt(built, tmp_path, monkeypatch):
    """A folder in the previous format (cltrace.features/1: no label_examples) still reads, as
    not current; the starter set's cached pages in that format are rebuilt once, then reused."""
    import shutil
    from types import SimpleNamespace

    import cltrace.features.starter as starter
    import cltrace.training.corpus as corpus
    import cltrace.training.starter as training_starter

    out, _ = built
    old = tmp_path / "cache" / "starter" / "t-pages"
    shutil.copytree(out, old)
    data = json.loads(gzip.decompress((old / "labels.json.gz").read_bytes()))
    data["format"] = "cltrace.features/1"
    for v in data["layers"].values():
        del v["label_examples"]
    (old / "labels.json.gz").write_bytes(gzip.compress(json.dumps(data).encode()))
    pages, now = FeaturePages(old), FeaturePages(out)
    assert not pages.current and now.current
    for L in LAYERS:
        for f in range(40):
            assert pages.label(L, f) == now.label(L, f)
            assert pages.label_examples(L, f) == (None if now.label(L, f) else 0)

    built_into = []

    def fake_build(model, tokenizer, transcoders, rows, layers, folder, **kw):
        built_into.append(folder)
        shutil.copytree(out, folder)

    monkeypatch.setattr(starter, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(starter, "build_pages", fake_build)
    monkeypatch.setattr(training_starter, "starter_corpus", lambda loaded, tag, progress: SimpleNamespace(train=["x"]))
    monkeypatch.setattr(corpus, "token_rows", lambda *a, **kw: torch.zeros(1, 4, dtype=torch.int64))
    loaded = SimpleNamespace(model=None, tokenizer=None)
    ts = SimpleNamespace(info={"set_id": "cltrace-starter/t"}, layers={0: None})
    said = []
    for _ in range(2):
        got = starter.starter_pages(loaded, ts, progress=said.append)
        assert got.current and got.label_examples(0, 0) == now.label_examples(0, 0)
    assert built_into == [old] and "older format" in said[0]


# --- the command -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_inputs(setup, tmp_path_factory):
    """A saved tiny model with a word-level tokenizer, its transcoders in the Gemma Scope 2
    layout, a set for another model, and a text corpus of those words."""
    from cltrace.transcoders.write import save_gemmascope
    from support.tiny_gemma import save_word_tokenizer

    model, _, ts = setup
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", WORDS)
    save_gemmascope(ts, root / "tc")
    save_gemmascope(random_transcoders(n_layers=3, d_model=16, d_sae=8), root / "other")
    g = np.random.default_rng(0)
    docs = [" ".join(g.choice(WORDS, size=40)) for _ in range(12)]
    (root / "corpus.txt").write_text("\n\n\n".join(docs))
    return root


def _cli(root, out, *extra):
    from cltrace.cli import main

    return main(["features", "--model", str(root / "model"), "--transcoders", str(root / "tc"),
                 "--corpus", str(root / "corpus.txt"), "--tokens", "300", "--ctx", "24",
                 "--top-k", "5", "--samples", "8", "--window", "3", "--batch-rows", "4",
                 "--out", str(out), "--quiet", *extra])


def test_cli_builds_labelled_pages(cli_inputs, tmp_path, capsys):
    assert _cli(cli_inputs, tmp_path / "p", "--layers", "1-2") == 0
    pages = FeaturePages(tmp_path / "p")
    n = pages.meta["n_tokens"]  # whole rows of 24 (BOS and document boundaries not counted)
    assert f"features fired on {n} tokens" in capsys.readouterr().out and 300 <= n < 300 + 24
    assert pages.layers == [1, 2]
    labels = [pages.label(L, f) for L in (1, 2) for f in range(40) if pages.label(L, f)]
    assert labels and all(lab.startswith('"w') for lab in labels)
    page = pages.page(1, next(f for f in range(40) if pages.label(1, f)))
    assert all(t.startswith("w") or t == "<bos>" for g in page["examples_quantiles"]
               for e in g["examples"] for t in e["tokens"])
    assert not (tmp_path / "p" / ".work").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "corpus file not found"),
    ("empty", "is empty"),
    ("binary", "blob.txt: a binary file, not text"),
    ("other_model", "trained for another model"),
    ("layers", "layers [3, 4, 5] are not in the set (transcoders)"),
    ("out_not_empty", "exists and is not empty"),
])
def test_cli_bad_inputs_exit_2_before_any_work(cli_inputs, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    args = []
    corpus = cli_inputs / "corpus.txt"
    if case == "missing":
        corpus = tmp_path / "nope.txt"
    elif case == "empty":
        corpus = tmp_path / "empty.txt"
        corpus.write_text("  \n")
    elif case == "binary":
        corpus = tmp_path / "blob.txt"
        corpus.write_bytes(b"text\0\x01\x02" * 10)
    elif case == "other_model":
        args = ["--transcoders", str(cli_inputs / "other")]
    elif case == "layers":
        args = ["--layers", "0-5"]
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    from cltrace.cli import main

    rc = main(["features", "--model", str(cli_inputs / "model"), "--transcoders", str(cli_inputs / "tc"),
               "--corpus", str(corpus), "--tokens", "100", "--ctx", "24", "--out", str(out),
               "--quiet", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert lines[0].startswith("cltrace features: error: ")
    if case == "out_not_empty":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()


@pytest.mark.real_model
def test_real_model_starter_pages(tmp_path, capsys):
    """The real Gemma 3 270M and its starter set on ~2k tokens of docstrings: pages for layers
    0 and 5, labels for every feature that fired, top examples that recompute."""
    from cltrace.cli import main
    from cltrace.models import load_model
    from cltrace.training.corpus import stdlib_texts, token_rows
    from cltrace.training.starter import starter_transcoders

    assert main(["features", "--tokens", "2000", "--layers", "0,5", "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    pages = FeaturePages(tmp_path / "p")
    loaded = load_model("gemma-3-270m")
    ts = starter_transcoders(loaded, progress=lambda *a: None, bar=False)
    rows = token_rows(loaded.tokenizer, stdlib_texts(), 128, max_tokens=2000)
    per_row = (rows != loaded.tokenizer.bos_token_id).sum(1).cumsum(0)
    rows = rows[:int((per_row < 2000).sum()) + 1]
    bos = loaded.tokenizer.bos_token_id
    state = FeatureState.empty({0: ts.d_sae}, 128)
    enc = layer_encoders(ts, [0])
    scan(loaded.model, rows, enc, state, bos=bos, bar=False)
    st = state.layers[0]
    fired = torch.nonzero(st.count > 0).flatten().tolist()
    assert len(fired) > 100
    assert all(pages.label(0, f) for f in fired)
    assert not any(pages.label(0, f) for f in range(ts.d_sae) if f not in set(fired))
    assert sum(bool(pages.label(5, f)) for f in range(ts.d_sae)) > 100
    for f in fired[:: max(1, len(fired) // 5)]:
        page = pages.page(0, f)
        assert len(page["top_logits"]) == 10 and len(page["bottom_logits"]) == 10
        t = int(st.top.tok[f, 0])
        row, pos = divmod(t, 128)
        idx = torch.tensor([row])
        x = ActivationSource(loaded.model, rows, [0], bos, outputs=False).read(idx).x
        _, r, ff, a = next(encode_batch(enc, x))
        tok = token_ids(rows, idx, bos)
        got = a[(ff == f) & (tok[r] == t)]
        ex = page["examples_quantiles"][0]["examples"][0]
        assert ex["tokens_acts_list"][ex["train_token_ind"]] == pytest.approx(float(got[0]), rel=1e-3)
        assert ex["tokens"][ex["train_token_ind"]] == loaded.tokenizer.decode([int(rows[row, pos])])


def test_selection_with_ties_is_exact_in_any_order():
    """Many equal keys, entries arriving in shuffled batches and merged shards: the kept
    entries are always the K smallest (key, tok), as a direct sort says."""
    from cltrace.features.selection import Selection

    g = torch.Generator().manual_seed(3)
    n, d, k = 400, 6, 5
    feat = torch.randint(0, d, (n,), generator=g)
    tok = torch.randperm(10_000, generator=g)[:n]
    key = torch.randint(0, 4, (n,), generator=g).double()  # heavy ties
    act = torch.rand(n, generator=g)
    want = {f: sorted(((float(key[i]), int(tok[i])) for i in range(n) if feat[i] == f))[:k] for f in range(d)}
    parts = torch.randperm(n, generator=g).split(57)
    shards = []
    for s in range(3):
        sel = Selection.empty(d, k)
        for p in parts[s::3]:
            p = p[torch.argsort(tok[p])]  # each batch in token order, batches in any order
            sel.update(feat[p], key[p], tok[p], act[p])
        shards.append(sel)
    shards[2].merge(shards[0])
    shards[2].merge(shards[1])
    for sel in [shards[2]]:
        for f in range(d):
            got = list(zip(sel.key[f].tolist(), sel.tok[f].tolist()))[:len(want[f])]
            assert got == want[f], f


def test_activation_source_inputs_only(setup):
    """outputs=False records the same MLP inputs, no outputs (and skips the last MLP)."""
    model, rows, _ = setup
    idx = torch.tensor([4, 1])
    full = ActivationSource(model, rows, [0, 2], BOS).read(idx)
    inputs = ActivationSource(model, rows, [0, 2], BOS, outputs=False).read(idx)
    assert inputs.y is None and full.y is not None
    torch.testing.assert_close(inputs.x, full.x, rtol=0, atol=0)


# --- the scan on Ray actors (--ray) ----------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs whose actors import this checkout (or the installed
    package) and these tests' helpers."""
    import os

    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")  # the test extra: CI runs it
    import cltrace

    package_root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), package_root, os.environ.get("PYTHONPATH", "")])}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def saved_tiny(setup, tmp_path_factory):
    from support.features import save_tiny

    model, _, ts = setup
    return str(save_tiny(model, ts, tmp_path_factory.mktemp("ray") / "tiny.pt"))


@pytest.mark.ray
def test_ray_scan_gives_the_same_files(setup, built, ray_cluster, saved_tiny, tmp_path):
    """2 actors, 7 shards: every file equals the single-process build's, byte for byte (the
    actors at this process's torch thread count)."""
    import functools

    from support.features import load_tiny

    out, _ = built
    _build(setup, tmp_path / "r", ray=True, workers=2, threads=torch.get_num_threads(),
           loader=functools.partial(load_tiny, saved_tiny))
    assert _files(tmp_path / "r") == _files(out)


@pytest.mark.ray
def test_ray_lost_actor_and_interrupted_driver_resume(setup, built, ray_cluster, saved_tiny, tmp_path,
                                                      monkeypatch):
    """An actor dies in the middle of its first shard: a replacement rescans that shard. The
    driver is then interrupted after 3 shards (checkpointed); the rerun scans only the other
    4 (7 shards: the 7 batches of 3 rows); the files equal the single-process build's."""
    import functools

    import cltrace.features.cluster as cluster
    from support.features import load_tiny

    out, _ = built
    marker = tmp_path / "crashed"
    loader = functools.partial(load_tiny, saved_tiny, str(marker))
    real, scanned = cluster.scan_ray, []

    def interrupted(*a, **kw):
        def checkpoint(s):
            kw["checkpoint"](s)
            if len(s.meta["done_shards"]) == 3:
                raise KeyboardInterrupt
        return real(*a, **{**kw, "checkpoint": checkpoint, "every_s": 0.0})

    monkeypatch.setattr(cluster, "scan_ray", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(setup, tmp_path / "r", ray=True, workers=2, threads=torch.get_num_threads(), loader=loader)
    assert marker.exists()  # an actor did die
    state = FeatureState.load(tmp_path / "r" / ".work" / "state.pt")
    first = state.meta["done_shards"]
    assert len(first) == 3 and [tuple(s) for s in state.meta["shards"]] == \
        [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15), (15, 18), (18, 20)]
    monkeypatch.setattr(cluster, "scan_ray", lambda *a, **kw: scanned.extend(real(*a, **kw)) or scanned)
    _build(setup, tmp_path / "r", ray=True, workers=1, threads=torch.get_num_threads(), loader=loader)  # other --workers: same plan
    assert sorted(scanned) == sorted(set(range(7)) - set(first))
    assert _files(tmp_path / "r") == _files(out)


@pytest.mark.ray
def test_cli_ray_end_to_end(cli_inputs, ray_cluster, tmp_path, capsys):
    """`cltrace features --ray --workers 2` on the saved tiny model: the files of the run
    without --ray (the actors at this process's torch thread count, as the files' bits want)."""
    assert _cli(cli_inputs, tmp_path / "ray", "--layers", "1-2", "--ray", "--workers", "2",
                "--threads", str(torch.get_num_threads())) == 0
    assert _cli(cli_inputs, tmp_path / "one", "--layers", "1-2") == 0
    assert "features fired on" in capsys.readouterr().out
    assert _files(tmp_path / "ray") == _files(tmp_path / "one")


@pytest.mark.parametrize("extra, message", [
    (["--ray"], "--ray needs Ray: pip install 'cltrace[ray]'"),
    (["--ray", "--workers", "0"], "give at least 1 actor"),
    (["--workers", "2"], "--workers and --threads are for --ray"),
])
def test_cli_ray_errors_exit_2(cli_inputs, tmp_path, capsys, monkeypatch, extra, message):
    import sys

    if message.startswith("--ray needs"):
        monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = _cli(cli_inputs, tmp_path / "out", *extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("cltrace features: error: ") \
        and message in lines[0], err
    assert not (tmp_path / "out").exists()


# --- SAEs and crosscoders --------------------------------------------------------------------

@pytest.mark.parametrize("site, sites", [("resid_post", None), ("attn_out", None),
                                         ("mlp_out", None), ("resid_post", [0, 2])])
def test_sae_pages_top_activations_are_a_direct_encode(setup, tmp_path, site, sites):
    """Pages of SAEs at each site (and a crosscoder): each page's top examples are the largest
    activations of a dense encode of the site (plain module hooks, support.dictionaries) over
    every scanned token, their windows that encode around them, and the logits those of the
    site's residual direction (o_proj and post_attention_layernorm's gain for attn_out)."""
    from cltrace.features import build_pages
    from cltrace.features.logits import feature_logits
    from cltrace.features.store import cantor
    from cltrace.models.anatomy import text_parts
    from support.dictionaries import random_saes, site_acts

    model, rows, _ = setup
    ts = random_saes(model, rows[:6], site, d_sae=24, active=0.1, sites=sites)
    layers = sorted(ts.layers)
    s = FeatureSettings(top_k=4, n_samples=3, window=2, batch_rows=4, seed=1)
    build_pages(model, CharTok(), ts, rows, layers, tmp_path / "p", settings=s, bar=False)
    acts = site_acts(model, rows, site, layers)  # {L: [n_rows, ctx, width]}
    keep = rows != BOS
    parts = text_parts(model)
    checked = 0
    for L in layers:
        tc = ts.layers[L]
        z = acts[L] @ tc.W_enc + tc.b_enc
        dense = torch.where((z > tc.threshold) & keep[..., None], z, torch.zeros(()))  # [R, ctx, d_sae]
        fired = (dense > 0).flatten(0, 1).any(0)
        files = {f: tmp_path / "p" / "features" / f"{cantor(L, f)}.json" for f in range(24)}
        assert [f for f in range(24) if files[f].exists()] == torch.nonzero(fired).flatten().tolist()
        for f in torch.nonzero(fired).flatten().tolist():
            page = json.loads(files[f].read_text())
            top = page["examples_quantiles"][0]["examples"]
            centres = [ex["tokens_acts_list"][ex["train_token_ind"]] for ex in top]
            want = dense[..., f].flatten().sort(descending=True).values[:len(top)]
            np.testing.assert_allclose(centres, want.tolist(), rtol=1e-5, atol=1e-5)
            assert len(top) == min(4, int((dense[..., f] > 0).sum()))
            ex = top[0]
            row = int(torch.nonzero((dense[..., f] == dense[..., f].max())).flatten()[0])
            pos = int(torch.nonzero(dense[row, :, f] == dense[..., f].max()).flatten()[0])
            lo = max(0, pos - 2)
            np.testing.assert_allclose(ex["tokens_acts_list"],
                                       dense[row, lo:min(CTX, pos + 3), f].tolist(), rtol=6e-4, atol=1e-5)
            checked += 1
        # logits: the residual direction of each feature through the final norm and unembedding
        d = tc.W_dec[:, -1] if site == "resid_post" else tc.W_dec[:, 0]  # [d_sae, d_out]
        if site == "attn_out":
            block = parts.layers[L]
            d = block.self_attn.o_proj(d) * (1 + block.post_attention_layernorm.weight)
        lg = (d * (1 + parts.norm.weight)) @ parts.lm_head.weight.T  # [d_sae, vocab]
        feats = torch.arange(24)
        fl = feature_logits(model, ts, L, feats, n=5)
        assert torch.equal(fl.top, lg.detach().topk(5, dim=1).indices)
    assert checked >= 10


def test_cli_sae_pages_and_bad_sae_inputs(cli_inputs, setup, tmp_path, capsys):
    """`cltrace features --transcoders` a folder of attn_out SAEs: pages carry the set's id;
    an SAE set for another model and a layer it lacks: one line, exit 2, nothing written."""
    from cltrace.cli import main
    from cltrace.transcoders.write import save_gemmascope
    from support.dictionaries import random_saes

    model, rows, _ = setup
    saes = save_gemmascope(random_saes(model, rows[:6], "attn_out", d_sae=16, layers=[1]),
                           tmp_path / "attn_out_all")
    other = save_gemmascope(random_transcoders(site="resid_post", n_layers=3, d_model=32, d_sae=8),
                            tmp_path / "resid_other")
    base = ["features", "--model", str(cli_inputs / "model"), "--corpus",
            str(cli_inputs / "corpus.txt"), "--tokens", "100", "--ctx", "24", "--top-k", "3",
            "--samples", "2", "--window", "2", "--quiet"]
    assert main([*base, "--transcoders", str(saes), "--out", str(tmp_path / "p")]) == 0
    pages = FeaturePages(tmp_path / "p")
    assert pages.layers == [1] and pages.meta["site_in"] == "attn_out"
    page = next(json.loads(p.read_text()) for p in sorted((tmp_path / "p" / "features").glob("*.json"))
                if p.name[0].isdigit())
    assert page["transcoder_id"] == "attn_out_all" and page["layer"] == 1
    capsys.readouterr()
    for args, message in (([str(other)], "trained for another model"),
                          ([str(saes), "--layers", "0"], "not in the set (SAEs at attn_out)")):
        out = tmp_path / "bad"
        assert main([*base, "--transcoders", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
        assert not out.exists()
