"""Feature pages (``cltrace features``): exact state against brute force, shards, resume, the
page format, labels, and the command's errors. Tiny random Gemma 3; one test on the real 270M."""
from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cltrace.features import FeaturePages, FeatureState, build_pages, cantor, merge_states, pages_for_graph, uncantor
from cltrace.features.scan import encode_batch, layer_encoders, scan, token_ids
from cltrace.features.selection import EMPTY_TOK, sample_keys
from cltrace.features.state import HIST_BINS, quantile_values
from cltrace.models.activations import ActivationSource

from tiny_gemma import random_transcoders, tiny_gemma

BOS, VOCAB, CTX, LAYERS = 2, 300, 24, [0, 1, 2]
WORDS = [f"w{i}" for i in range(60)]  # tokenizer vocabulary beyond the 4 specials


class CharTok:
    """Stand-in tokenizer for the API tests: token i is shown as 't{i}'."""

    bos_token_id = BOS

    def batch_decode(self, ids):
        return [f"t{i[0]}" for i in ids]


@pytest.fixture(scope="module")
def setup():
    model = tiny_gemma(n_layers=3, vocab=VOCAB)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, VOCAB, (20, CTX), generator=g)
    rows[:, 0] = BOS
    rows[3, 9] = BOS  # a document boundary inside a row: no activations there
    x = ActivationSource(model, rows, LAYERS, BOS, outputs=False).read(torch.arange(6)).x
    ts = random_transcoders(x, d_sae=40, active=0.08)
    return model, rows, ts


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
            torch.testing.assert_close(st.act_max[f], a_f.max(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(st.act_min[f], a_f.min(), rtol=1e-5, atol=1e-6)
            # top-K: largest activations, ties by token id
            order = sorted(range(a_f.numel()), key=lambda j: (-float(a_f[j]), int(t_f[j])))[:5]
            assert st.top.tok[f, :len(order)].tolist() == [int(t_f[j]) for j in order]
            torch.testing.assert_close(st.top.act[f, :len(order)], a_f[order], rtol=1e-5, atol=1e-6)
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


def _build(setup, out, **kw):
    model, rows, ts = setup
    kw.setdefault("batch_rows", 3)
    return build_pages(model, CharTok(), ts, rows, LAYERS, out, top_k=5, n_samples=8, seed=7,
                       window=4, bar=False, **kw)


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
    },
}


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
                continue
            n_fired += 1
            page = json.loads(path.read_text())
            jsonschema.validate(page, PAGE_SCHEMA)
            rec = blob[offsets[f]:offsets[f + 1]]
            (n,) = struct.unpack("<I", rec[:4])
            assert json.loads(zlib.decompress(rec[4:4 + n])) == page == pages.page(L, f)
            assert page["index"] == f and page["label"] == pages.label(L, f) and " → " in page["label"]
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
            np.testing.assert_allclose(ex["tokens_acts_list"], want, rtol=2e-3, atol=2e-3)
            assert ex["tokens_acts_list"][pos - start] == pytest.approx(acts[pos], rel=1e-4, abs=1e-5)
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


# --- the command -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_inputs(setup, tmp_path_factory):
    """A saved tiny model with a word-level tokenizer, its transcoders in the Gemma Scope 2
    layout, a set for another model, and a text corpus of those words."""
    from cltrace.transcoders.write import save_gemmascope
    from synthetic import random_set
    from tiny_gemma import save_word_tokenizer

    model, _, ts = setup
    root = tmp_path_factory.mktemp("cli")
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", WORDS)
    save_gemmascope(ts, root / "tc")
    save_gemmascope(random_set(n_layers=3, d_model=16, d_sae=8), root / "other")
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
    ("layers", "layers [3, 4, 5] are not in the transcoder set"),
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
    from feature_fixtures import save_tiny

    model, _, ts = setup
    return str(save_tiny(model, ts, tmp_path_factory.mktemp("ray") / "tiny.pt"))


def test_ray_scan_gives_the_same_files(setup, built, ray_cluster, saved_tiny, tmp_path):
    """2 actors, 7 shards: every file equals the single-process build's, byte for byte (the
    actors at this process's torch thread count)."""
    import functools

    from feature_fixtures import load_tiny

    out, _ = built
    _build(setup, tmp_path / "r", ray=True, workers=2, threads=torch.get_num_threads(),
           loader=functools.partial(load_tiny, saved_tiny))
    assert _files(tmp_path / "r") == _files(out)


def test_ray_lost_actor_and_interrupted_driver_resume(setup, built, ray_cluster, saved_tiny, tmp_path,
                                                      monkeypatch):
    """An actor dies in the middle of its first shard: a replacement rescans that shard. The
    driver is then interrupted after 3 shards (checkpointed); the rerun scans only the other
    4 (7 shards: the 7 batches of 3 rows); the files equal the single-process build's."""
    import functools

    import cltrace.features.cluster as cluster
    from feature_fixtures import load_tiny

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
