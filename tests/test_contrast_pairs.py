"""cltrace contrast, minimal pairs: the pair checks before tracing (one prompt in each set, the
same number of tokens, counted with the tokenizer alone), and each pair's difference graph
(pair-{id}.json) checked node by node and edge by edge against its two source graphs, on the
tiny model with a planted feature that fires only on set A ("w q" against "w z": pairs of equal
length); the viewer's diff mode in headless Chromium."""
from __future__ import annotations

import json
import os

import pytest

from cltrace.cli import main
from cltrace.pipeline import slugify
from support import contrast as P

N, TRACE = P.N, P.TRACE


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """The contrast folder of the planted model's two sets, prompt i of A paired with prompt i of B."""
    return P.traced_folder(tmp_path_factory.mktemp("pairs"), *P.planted_replacement(), pairs=True)


# --- the direct computation: keys, values and carriers read straight off the two graphs -------

def _key(node):
    """Aligned key by the node id: "{layer}_{feature}_{pos}" (features, errors with feature -1,
    logits with the token id), "E_{token}_{pos}" (tokens, keyed by position alone)."""
    if node["feature_type"] == "embedding":
        return ("E", node["ctx_idx"])
    if node["feature_type"] == "logit":
        return ("L", node["node_id"].split("_")[1])
    return tuple(node["node_id"].split("_"))


def _direct(g):
    """(key -> node, key -> value compared, (source key, target key) -> weight) of one graph."""
    by_id = {n["node_id"]: n for n in g["nodes"]}
    nodes = {_key(n): n for n in g["nodes"]}
    edges = {(_key(by_id[l["source"]]), _key(by_id[l["target"]])): l["weight"] for l in g["links"]}
    values = {}
    for k, n in nodes.items():
        if n["feature_type"] == "cross layer transcoder":
            values[k] = n["activation"]
        elif n["feature_type"] == "logit":
            values[k] = n["token_prob"]
        else:  # tokens, error nodes: the sum of their edges' weights
            values[k] = sum(l["weight"] for l in g["links"] if l["source"] == n["node_id"])
    return nodes, values, edges


def test_every_pair_graph_against_its_two_source_graphs(paired):
    report = json.loads((paired / "contrast.json").read_text())
    assert [p["id"] for p in report["pairs"]] == [str(i) for i in range(N)]
    shared_features = 0
    for i, entry in enumerate(report["pairs"]):
        sa, sb = entry["slugs"]
        assert (sa, sb) == (f"a-{slugify(P.SET_A[i])}", f"b-{slugify(P.SET_B[i])}")
        ga, gb = (json.loads((paired / f"{s}.json").read_text()) for s in (sa, sb))
        d = json.loads((paired / entry["graph"]).read_text())
        assert entry["graph"] == f"pair-{i}.json" and d["metadata"]["slug"] == f"pair-{i}"
        na, va, ea = _direct(ga)
        nb, vb, eb = _direct(gb)
        by_id = {n["node_id"]: n for n in d["nodes"]}
        assert len(by_id) == len(d["nodes"])  # node ids unique
        got = {_key(n): n for n in d["nodes"]}
        assert set(got) == set(na) | set(nb) and len(got) == len(d["nodes"])
        counts = {"a": 0, "b": 0, "both": 0}
        for k, n in got.items():
            p = n["pair"]
            want_in = "both" if k in na and k in nb else "a" if k in na else "b"
            counts[want_in] += 1
            assert p["in"] == want_in, k
            a, b = va.get(k), vb.get(k)
            assert p["a"] == pytest.approx(a) if a is not None else p["a"] is None
            assert p["b"] == pytest.approx(b) if b is not None else p["b"] is None
            assert p["diff"] == pytest.approx((b or 0.0) - (a or 0.0), abs=1e-12)
            assert p["influence"] == [na[k]["influence"] if k in na else None, nb[k]["influence"] if k in nb else None]
            src = na.get(k) or nb[k]  # the usual fields: A's where A has it
            assert n["influence"] == src["influence"] and n.get("activation") == src.get("activation")
            if n["feature_type"] == "cross layer transcoder" and want_in == "both":
                shared_features += 1
                assert p["a"] == na[k]["activation"] and p["b"] == nb[k]["activation"]
        assert counts == entry["nodes"] == d["metadata"]["info"]["pair_diff"]["nodes"]
        gl = {(_key(by_id[l["source"]]), _key(by_id[l["target"]])): l for l in d["links"]}
        assert set(gl) == set(ea) | set(eb) and len(gl) == len(d["links"])
        lcounts = {"a": 0, "b": 0, "both": 0}
        for e, l in gl.items():
            wa, wb = ea.get(e), eb.get(e)
            c = "both" if wa is not None and wb is not None else "a" if wa is not None else "b"
            lcounts[c] += 1
            assert l["pair"] == {"in": c, "a": wa, "b": wb, "diff": pytest.approx((wb or 0.0) - (wa or 0.0))}
            assert l["weight"] == (wa if wa is not None else wb)
        assert lcounts == entry["links"]
        # the tokens: the same up to the last one, where "q" meets "z"
        ta, tb = ga["metadata"]["prompt_tokens"], gb["metadata"]["prompt_tokens"]
        assert d["metadata"]["prompt_tokens"] == ta[:-1] + [f"{ta[-1]}|{tb[-1]}"] and ta[:-1] == tb[:-1]
        last = len(ta) - 1
        emb = [n for n in d["nodes"] if n["feature_type"] == "embedding" and n["ctx_idx"] == last]
        assert [n["clerp"] for n in emb] == [f'Emb: "{ta[-1]}|{tb[-1]}"']
        # the planted feature: set A's prompt only, at the last position
        plant = got[("0", str(P.PLANT), str(last))]["pair"]
        assert plant["in"] == "a" and plant["a"] > 9.9 and plant["b"] is None and plant["diff"] == -plant["a"]
        assert not [n for n in d["nodes"] if n["jsNodeId"] == f"0_{P.PLANT}-0" and n["ctx_idx"] != last]
        info = d["metadata"]["info"]["pair_diff"]
        assert info["sets"] == ["a", "b"] and info["slugs"] == [sa, sb] and info["difference"] == "b - a"
        assert d["metadata"]["prompt"] == f"{P.SET_A[i]} | {P.SET_B[i]}"
    assert shared_features > 0  # features kept in both prompts carry both activations (checked above)


def test_pair_graphs_follow_the_graph_schema(paired):
    import jsonschema

    from cltrace.export.neuronpedia import GRAPH_SCHEMA_PATH

    schema = json.loads(GRAPH_SCHEMA_PATH.read_text())
    for p in json.loads((paired / "contrast.json").read_text())["pairs"]:
        jsonschema.validate(json.loads((paired / p["graph"]).read_text()), schema)


def test_report_rebuilds_the_pair_graphs(paired, capsys):
    before = {p.name: p.read_bytes() for p in paired.glob("pair-*.json")}
    for p in paired.glob("pair-*.json"):
        p.unlink()
    assert main(["contrast", "--report", str(paired)]) == 0
    assert f"{N} pair graphs" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in paired.glob("pair-*.json")} == before


# --- bad input: one line, exit 2, before any tracing -----------------------------------------

def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("case, message", [
    ("twice", "pair '2': 2 prompt(s) in set 'a' and 1 in set 'b' (a pair needs exactly one prompt in each set)"),
    ("alone", "pair 'solo': 1 prompt(s) in set 'a' and 0 in set 'b'"),
    ("length", "pair '3': prompt 'a-abc-def-q' has 10 tokens and 'b-abc-def-zz' has 11 (the graphs of a pair "
               "are aligned position by position"),
    ("named", "a set named 'pair' would share the pair graphs' names"),
])
def test_bad_pairs_are_one_line_before_tracing(tmp_path, capsys, monkeypatch, case, message):
    import cltrace.models
    from support.tiny_gemma import CharTokenizer

    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: pytest.fail("it started tracing"))
    monkeypatch.setattr(cltrace.models, "load_tokenizer", lambda *a, **k: CharTokenizer())
    a, b = P.write_sets(tmp_path, N, pairs=True)
    ra, rb = _rows(a), _rows(b)
    if case == "twice":
        ra[5]["pair"] = 2
    elif case == "alone":
        ra[5]["pair"] = "solo"
    elif case == "length":  # "<bos>abc def q" against "<bos>abc def zz"
        rb[3]["prompt"] = rb[3]["prompt"] + "z"
    _write(a, ra)
    _write(b, rb)
    out = tmp_path / "out"
    names = ["--names", "pair", "b"] if case == "named" else []
    assert main(["contrast", str(a), str(b), "--out", str(out), *names, "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_prompts_without_pair_are_not_paired(tmp_path):
    """Unpaired prompts next to paired ones: no tokenizer needed when none is paired; the
    paired ones are checked."""
    from argparse import Namespace

    import cltrace.models
    from cltrace.commands.contrast import read_sets
    from cltrace.contrast.pairs import check_pairs

    a, b = P.write_sets(tmp_path, N)
    args = Namespace(sets=[str(a), str(b)], chat=False, names=None, n_perm=10000, alpha=0.05, model="none")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cltrace.models, "load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded"))
        names, sets = read_sets(args)
    assert check_pairs(names, sets) == []
    ra, rb = _rows(a), _rows(b)
    ra[0]["pair"], rb[5]["pair"] = "p", "p"  # "the cat sat q", "big red box z": 14 tokens each
    _write(a, ra)
    _write(b, rb)
    with pytest.MonkeyPatch.context() as mp:
        from support.tiny_gemma import CharTokenizer

        mp.setattr(cltrace.models, "load_tokenizer", lambda *a, **k: CharTokenizer())
        names, sets = read_sets(args)
    assert [(pid, x.slug, y.slug) for pid, x, y in check_pairs(names, sets)] == [
        ("p", "a-the-cat-sat-q", "b-big-red-box-z")]


def test_one_file_with_label_and_pair(tmp_path, monkeypatch):
    """One JSONL with 'label' and 'pair' columns: pairs across the two labels, in set A's order."""
    from argparse import Namespace

    import cltrace.models
    from cltrace.commands.contrast import read_sets
    from cltrace.contrast.pairs import check_pairs
    from support.tiny_gemma import CharTokenizer

    monkeypatch.setattr(cltrace.models, "load_tokenizer", lambda *a, **k: CharTokenizer())
    one = tmp_path / "one.jsonl"  # set "zed" first (its prompts in reverse order), then "queue"
    rows = ([{"prompt": P.SET_B[i], "label": "zed", "pair": f"w{i}"} for i in reversed(range(N))] +
            [{"prompt": P.SET_A[i], "label": "queue", "pair": f"w{i}"} for i in range(N)])
    _write(one, rows)
    names, sets = read_sets(Namespace(sets=[str(one)], chat=False, names=None, n_perm=10000, alpha=0.05, model="x"))
    assert names == ["zed", "queue"]
    got = [(pid, x.prompt, y.prompt) for pid, x, y in check_pairs(names, sets)]
    assert got == [(f"w{i}", P.SET_B[i], P.SET_A[i]) for i in reversed(range(N))]


def test_lengths_counted_by_the_tokenizer_alone(tmp_path, capsys):
    """A model folder with its config and tokenizer but no weights (load_model cannot run on
    it): the pair check reads the tokenizer alone (a word-level one: one token a word, no
    <bos> added), and refuses a pair of 3 against 4 tokens."""
    from support.tiny_gemma import save_word_tokenizer, tiny_replacement

    from cltrace.contrast.pairs import n_tokens
    from cltrace.models import load_tokenizer
    from cltrace.pipeline import PromptSpec

    model = tmp_path / "model"
    tiny_replacement("clt").model.save_pretrained(model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    save_word_tokenizer(model, "the cat dog sat ran big".split())
    tok = load_tokenizer(str(model))
    assert n_tokens(tok, PromptSpec("the cat sat", "s")) == 3
    assert n_tokens(tok, PromptSpec("the big dog ran", "s")) == 4
    rows = [["the cat sat", "the dog sat"], ["the cat ran", "the big dog ran"], ["big cat", "big dog"]]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, col in ((a, 0), (b, 1)):
        _write(path, [{"prompt": r[col], "pair": i} for i, r in enumerate(rows)] +
               [{"prompt": f"the {w}"} for w in ("cat", "dog", "sat", "ran", "big", "cat cat")])
    assert main(["contrast", str(a), str(b), "--out", str(tmp_path / "out"), "--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pair '1': prompt 'a-the-cat-ran' has 3 tokens and 'b-the-big-dog-ran' has 4 "
                        "(the graphs of a pair are aligned position by position: give its prompts the "
                        "same number of tokens)"), err


@pytest.mark.real_model
def test_gemma_tokenizer_counts_chat_and_messages_as_traced(real_gemma):
    """The 270M's tokenizer loaded alone (no weights) gives as many tokens as tracing runs on
    with the loaded model's tokenizer (the replacement model's tokenize: plain prompts with
    <bos>, --chat turns, conversations with a system message and a prefill)."""
    from cltrace.contrast.pairs import n_tokens
    from cltrace.models import load_tokenizer
    from cltrace.models import DEFAULT_MODEL, prompt_tokens
    from cltrace.pipeline import PromptSpec

    tok = load_tokenizer(DEFAULT_MODEL)
    specs = [PromptSpec("The cat sat on the mat", "a"), PromptSpec("hello", "b", chat=True),
             PromptSpec("x", "c", messages=(("system", "Be brief."), ("user", "Tell me a joke"), ("model", "Sure,")))]
    for s in specs:
        _, ids = prompt_tokens(real_gemma.tokenizer, s.prompt, s.chat, s.messages)
        if isinstance(ids, str):  # as ReplacementModel.tokenize: the tokenizer adds <bos>
            ids = real_gemma.tokenizer(ids, return_tensors="pt")["input_ids"][0]
        assert n_tokens(tok, s) == len(ids)
    assert [n_tokens(tok, s) for s in specs[:2]] == [7, 10]


# --- the viewer's diff mode -------------------------------------------------------------------

@pytest.mark.browser
def test_pair_graph_diff_mode_in_a_browser(paired):
    """the report page's pair table links pair-0.json, which opens; the diff control shows with its legend; colouring by carrier, by
    difference and by kind gives the planted (A-only) node three different computed fills, and
    A-only and B-only nodes differ by carrier; the node card shows both values; an ordinary graph
    hides the control; no JS error, no request off the server."""
    from support.serve import browser_missing, cleanup, launch_chromium, serving, watch_page

    why = browser_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    d = json.loads((paired / "pair-0.json").read_text())
    last = len(d["metadata"]["prompt_tokens"]) - 1
    plant = f"0_{P.PLANT}_{last}"
    b_only = next(n["node_id"] for n in d["nodes"] if n["pair"]["in"] == "b")
    both = next(n["node_id"] for n in d["nodes"] if n["pair"]["in"] == "both" and n["feature_type"] != "embedding")
    fill = "(id) => getComputedStyle(document.querySelector(`[data-id='${id}']`)).fill"
    with serving(paired) as url, sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        try:
            pg = ctx.new_page()
            errors, foreign = watch_page(pg, url)
            pg.goto(f"{url}/contrast.html")  # the report lists the pairs and links their graphs
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            assert pg.locator("#pair-table tbody tr").count() == N
            pg.locator("#pair-table a", has_text="pair-0.json").click()
            pg.wait_for_url("**/#graph=pair-0.json")
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            assert pg.locator("#diff-control").is_visible() and pg.locator("#diff-legend").is_visible()
            assert pg.evaluate("document.body.dataset.diffMode") == "carrier"
            legend = pg.locator("#diff-legend").inner_text()
            assert "A (a) only" in legend and "B (b) only" in legend and "both" in legend
            carrier = {i: pg.evaluate(fill, i) for i in (plant, b_only, both)}
            assert len(set(carrier.values())) == 3, carrier
            pg.select_option("#diff-mode", "diff")
            assert pg.evaluate("document.body.dataset.diffMode") == "diff"
            by_diff = pg.evaluate(fill, plant)
            assert pg.locator("#diff-legend .diverging").count() == 1
            pg.select_option("#diff-mode", "kind")
            by_kind = pg.evaluate(fill, plant)
            assert len({carrier[plant], by_diff, by_kind}) == 3, (carrier[plant], by_diff, by_kind)
            # the planted feature is larger in A: the blue end of the scale (its diff is the largest |diff|)
            assert by_diff == "rgb(33, 102, 172)"
            pg.select_option("#diff-mode", "carrier")
            pg.locator(f"[data-id='{plant}']").click()
            pg.wait_for_selector("#pair-card")
            card = pg.locator("#pair-card").inner_text()
            a_val = next(n for n in d["nodes"] if n["node_id"] == plant)["pair"]["a"]
            assert "in A (a) only" in card and f"{a_val:.4f}" in card and f"{-a_val:.4f}" in card
            assert pg.locator("svg#graph path.link.in-a").count() > 0  # its links coloured by carrier
            pg.goto(f"{url}/#graph=a-the-cat-sat-q.json")
            pg.reload()
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            assert not pg.locator("#diff-control").is_visible()
            assert pg.evaluate("document.body.dataset.diffMode") == ""
            assert errors == [] and foreign == []
        finally:
            ctx.close()
            cleanup(profile)
