"""``cltrace lens`` and :func:`cltrace.lens.feature_lens`: the top latents of SAEs at every site and of
a crosscoder (written in the Gemma Scope 2 layout, loaded back) against a hook-based dense
reference encode on the tiny model; <bos> handling, layers, the JSON and the table; the command
end to end and its bad inputs; the real model; the viewer's lens page in a browser."""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.cli import main
from cltrace.lens import LENS_FORMAT, feature_lens
from support.cli import one_line_error
from support.lens import LENS_TOKENS, hook_activations, lens_setup, reference_encode
from support.tiny_gemma import CharTokenizer

BOS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return lens_setup(tmp_path_factory.mktemp("lens"))


def test_lens_equals_a_hook_based_reference_encode(setup):
    """Every (set, layer, position): the lens's latents are the reference's k largest active
    latents, in order, with their activations (to fp32 rounding); fewer when fewer fire."""
    model, sets = setup
    names = list(sets)
    k = 6
    rep = feature_lens(model, [sets[n] for n in names], torch.tensor(LENS_TOKENS), top_k=k,
               names=names, bos_token_id=BOS)
    assert rep.positions == [p for p, t in enumerate(LENS_TOKENS) if t != BOS]
    assert rep.bos == [t == BOS for t in LENS_TOKENS]
    checked = short = 0
    for s, name in enumerate(names):
        ts = sets[name]
        x = hook_activations(model, ts.site_in, torch.tensor(LENS_TOKENS))  # [n_layers, T, width]
        assert rep.sets[s].layers == sorted(ts.layers)
        for L in ts.layers:
            ref = reference_encode(x[L], ts.layers[L])  # [T, d_sae]
            for pos in rep.positions:
                got = rep.top(s, L, pos)
                active = int((ref[pos] > 0).sum())
                want = ref[pos].topk(min(k, active))
                assert [i for i, _ in got] == want.indices.tolist(), (name, L, pos)
                torch.testing.assert_close(torch.tensor([a for _, a in got]), want.values,
                                           rtol=1e-5, atol=1e-5)
                assert all(a >= b for (_, a), (_, b) in zip(got, got[1:]))  # largest first
                checked += 1
                short += active < k
    assert checked == len(rep.positions) * (3 * 3 + 2) and short > 0  # some cells have < k
    assert sets["attn_out"].d_model == 96 and sets["resid_post"].d_model == 64  # heads x head_dim
    assert all(rep.top(s, L, 0) == [] for s in range(4) for L in rep.sets[s].layers)  # <bos>


def test_bos_layers_and_one_pass(setup):
    """include_bos encodes the <bos> positions too (as the reference does); layers= restricts
    every set, a layer a set lacks is one error naming it; the model runs once, stopping
    after the last layer read."""
    from cltrace.errors import UsageError

    model, sets = setup
    ts = sets["resid_post"]
    rep = feature_lens(model, ts, torch.tensor(LENS_TOKENS), top_k=3, bos_token_id=BOS, include_bos=True)
    assert rep.positions == list(range(len(LENS_TOKENS)))
    ref = reference_encode(hook_activations(model, "resid_post", torch.tensor(LENS_TOKENS))[1],
                           ts.layers[1])
    assert [i for i, _ in rep.top(0, 1, 0)] == ref[0].topk(3).indices.tolist()

    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, L=L: calls.append(L))
             for L, b in enumerate(model.model.layers)]
    try:
        rep = feature_lens(model, [ts, sets["crosscoder"]], torch.tensor(LENS_TOKENS), layers=[0],
                   bos_token_id=BOS)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0]  # one pass, layers 1 and 2 never run
    assert [s.layers for s in rep.sets] == [[0], [0]]
    with pytest.raises(UsageError, match=r"has no dictionary at layer\(s\) 1 \(it has 0,2\)"):
        feature_lens(model, [ts, sets["crosscoder"]], torch.tensor(LENS_TOKENS), layers=[1])
    with pytest.raises(UsageError, match="empty"):
        feature_lens(model, ts, "  ", tokenizer=CharTokenizer())


def test_json_and_table(setup):
    model, sets = setup
    rep = feature_lens(model, [sets["attn_out"], sets["crosscoder"]], "abc", top_k=2, names=["a", "c"],
               tokenizer=CharTokenizer())
    data = json.loads(json.dumps(rep.to_json(label=lambda s, L, i: f"lab{s}.{L}.{i}",
                                             page=lambda s, L, i: None)))
    assert data["format"] == LENS_FORMAT and data["top_k"] == 2 and data["include_bos"] is False
    assert data["text"] == "abc"
    assert [t["pos"] for t in data["tokens"]] == [0, 1, 2, 3] and data["tokens"][0]["bos"] is True
    assert [(s["name"], s["site"], s["layers"]) for s in data["sets"]] == [
        ("a", "attn_out", [0, 1, 2]), ("c", "resid_post", [0, 2])]
    assert len(data["cells"]) == 3 * (3 + 2)  # (set, layer, encoded position)
    for c in data["cells"]:
        assert [(d["index"], d["act"]) for d in c["latents"]] == [
            (i, round(a, 6)) for i, a in rep.top(c["set"], c["layer"], c["pos"])]
        assert all(d["label"] == f"lab{c['set']}.{c['layer']}.{d['index']}" for d in c["latents"])
    lines = rep.table().splitlines()
    assert lines[0].split()[:4] == ["pos", "token", "set", "layer"]
    assert "<bos>: not encoded" in lines[1]
    assert len(lines) == 1 + 1 + 3 * 5
    i, a = rep.top(0, 0, 1)[0]
    assert lines[2].split()[2:5] == ["0", "0", f"{i}:{a:.2f}"]


@pytest.fixture
def tiny_cli(monkeypatch, setup):
    import cltrace.models
    import cltrace.training.starter

    model, sets = setup
    loaded = cltrace.models.LoadedModel(model, CharTokenizer(), "tiny")
    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: loaded)
    monkeypatch.setattr(cltrace.training.starter, "starter_transcoders",
                        lambda *a, **k: sets["mlp_out"])
    return model, sets


def test_cli(tiny_cli, tmp_path, capsys):
    """The table, --json (the API's numbers), several --dict, --layers and --top-k."""
    model, sets = tiny_cli
    js = tmp_path / "lens.json"
    sae = sets["resid_post"].source
    rc = main(["lens", "hello", "--dict", sae, "--sae", "starter", "--layers", "1-2", "--top-k", "3",
               "--json", str(js), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    lines = out.splitlines()
    assert lines[0].startswith("lens of 6 tokens on tiny, top 3 per layer: [0]") and "SAEs at mlp_out" in lines[0]
    assert lines[1].split()[:4] == ["pos", "token", "set", "layer"] and f"wrote {js}" in out
    data = json.loads(js.read_text())
    assert data["sources"] == [sae, "starter"] and data["text"] == "hello"
    ref = feature_lens(model, [sets["resid_post"], sets["mlp_out"]], "hello", top_k=3, layers=[1, 2],
               tokenizer=CharTokenizer())
    assert data["cells"] == ref.to_json()["cells"]
    assert main(["lens", "hi", "--quiet"]) == 0  # default: the starter set
    assert "SAEs at mlp_out" in capsys.readouterr().out


def test_cli_bad_inputs(tiny_cli, tmp_path, capsys):
    from cltrace.transcoders.write import save_gemmascope
    from support.transcoders import random_transcoders

    model, sets = tiny_cli
    out = tmp_path / "out"
    out.mkdir()
    js = out / "lens.json"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\0def")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    other = save_gemmascope(random_transcoders(n_layers=3, d_model=16, site="resid_post"), tmp_path / "other")
    narrow = save_gemmascope(random_transcoders(n_layers=3, d_model=64, site="attn_out"), tmp_path / "narrow")
    cases = [
        ([" "], ["empty"]),
        (["--prompt-file", str(binary)], ["bin.txt", "binary"]),
        (["--prompt-file", str(empty)], ["empty"]),
        (["--prompt-file", str(tmp_path / "missing.txt")], ["missing.txt"]),
        (["x", "--layers", "5"], ["--layers", "layer(s) 5", "0-2"]),
        (["x", "--dict", str(other)], ["d_model 16", "another model"]),
        (["x", "--dict", str(narrow)], ["input width 64", "heads x head_dim 96"]),
        (["x", "--dict", str(tmp_path / "no-set")], ["no-set"]),
        (["x", "--top-k", "0"], ["--top-k"]),
        (["x", "--layers", "a-b"], ["--layers", "a-b"]),
        (["x", "--features", str(tmp_path)], ["--features", "not a feature pages folder"]),
        (["x", "--json", str(tmp_path / "nowhere" / "l.json")], ["does not exist"]),
        ([], ["PROMPT", "--prompt-file"]),
    ]
    for args, needles in cases:
        argv = ["lens", *args, "--quiet"] + ([] if "--json" in args else ["--json", str(js)])
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: a bad option value
            rc = e.code
        assert rc == 2, args
        one_line_error(capsys, *needles)
        assert list(out.iterdir()) == [], args  # nothing written


def test_lazy_export():
    import cltrace
    from cltrace.lens import LensReport

    assert cltrace.feature_lens is feature_lens and cltrace.LensReport is LensReport


def test_cli_labels_and_pages(tiny_cli, tmp_path, capsys):
    """--features DIR (one per --dict, 'none' to skip one): labels in the table and the JSON,
    and the pages of the latents shown copied beside the JSON, named as the viewer reads them."""
    from support.lens import write_pages

    model, sets = tiny_cli
    pages = write_pages(tmp_path / "pages", [0, 1, 2], 40)
    js = tmp_path / "out" / "lens.json"
    js.parent.mkdir()
    assert main(["lens", "abc", "--dict", "starter", "--dict", sets["attn_out"].source,
                 "--features", str(pages), "--features", "none", "--top-k", "2", "--json", str(js),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "[L0 f" in out and "[L2 f" in out
    data = json.loads(js.read_text())
    assert [s["pages"] for s in data["sets"]] == ["./lens-pages/set0", None]
    for c in data["cells"]:
        for lat in c["latents"]:
            if c["set"] == 0:
                assert lat["label"] == f"L{c['layer']} f{lat['index']}"
                page = json.loads((js.parent / lat["page"]).read_text())
                assert page["label"] == lat["label"]
            else:
                assert "label" not in lat and "page" not in lat


@pytest.mark.browser
def test_lens_page_in_a_browser(tiny_cli, tmp_path, capsys):
    """``cltrace serve`` of a folder holding a lens (with pages): /lens.html draws the token x
    layer grid (each cell the top latent), a click on a cell lists its latents and opens the
    feature card with the page's label and examples; no JS error, no request off the server;
    the graph list does not take the lens for a graph."""
    import urllib.request

    from support.lens import write_pages
    from support.serve import browser_missing, cleanup, launch_chromium, serving, watch_page

    why = browser_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    model, sets = tiny_cli
    pages = write_pages(tmp_path / "pages", [0, 1, 2], 40)
    root = tmp_path / "served"
    root.mkdir()
    assert main(["lens", "nodes here", "--dict", "starter", "--features", str(pages),
                 "--json", str(root / "lens.json"), "--quiet"]) == 0
    capsys.readouterr()
    data = json.loads((root / "lens.json").read_text())
    with serving(root) as url, sync_playwright() as pw:
        graphs = json.loads(urllib.request.urlopen(f"{url}/api/graphs").read())["graphs"]
        assert graphs == []  # ("nodes" is in the text, yet it is no graph)
        ctx, profile = launch_chromium(pw)
        try:
            pg = ctx.new_page()
            errors, foreign = watch_page(pg, url)
            missing = []  # HTTP 4xx answers, counted below
            pg.on("response", lambda r: missing.append(r.url) if r.status >= 400 else None)
            pg.goto(f"{url}/lens.html")
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            n_tok = len(data["tokens"])
            assert pg.locator("#lens-table tbody tr").count() == 3  # layers 2, 1, 0
            assert pg.locator("#lens-table thead th").count() == 1 + n_tok
            assert pg.locator("td.lens-cell.empty").count() == 3  # the <bos> column
            cell = next(c for c in data["cells"] if c["layer"] == 1 and c["pos"] == 3)
            td = pg.locator('td.lens-cell[data-layer="1"][data-pos="3"]')
            assert td.inner_text() == str(cell["latents"][0]["index"])
            td.click()
            pg.wait_for_selector("#feature-body h3.feature-label")
            assert not pg.locator("#cell-card").is_hidden()
            assert pg.locator(".lens-latents li").count() == len(cell["latents"])
            assert pg.locator("#feature-body h3.feature-label").inner_text() == cell["latents"][0]["label"]
            pg.wait_for_selector("#feature-body .quantile.top .example")
            pg.locator(".lens-latents button").nth(1).click()  # another latent of the cell
            pg.wait_for_function(f"document.querySelector('#feature-body h3').textContent === "
                                 f"{json.dumps(cell['latents'][1]['label'])}")
            assert errors == [] and foreign == []
            assert [u for u in missing if not u.endswith("/favicon.ico")] == []
        finally:
            ctx.close()
            cleanup(profile)


@pytest.mark.real_model
def test_real_model(real_gemma):
    """The 270M with random resid_post SAEs (calibrated on the sentence) at layers 3 and 9 and
    the sites read by a forward hook: the lens's latents are the reference's top-k; the chat
    turn is tokenized with its own <bos> (flagged, not encoded)."""
    from support.transcoders import random_transcoders

    text = "The capital of France is Paris."
    tok = real_gemma.tokenizer
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    acts = hook_activations(real_gemma.model, "resid_post", ids)  # [18, T, 640]
    ts = random_transcoders(mlp_in=acts, d_sae=512, site="resid_post", seed=5, layers=[3, 9],
                            model_name="gemma-3-270m")
    rep = feature_lens(real_gemma, ts, text, top_k=4)
    assert rep.tokens[0] == "<bos>" and rep.bos[0] and rep.positions == list(range(1, ids.numel()))
    assert "".join(rep.tokens[1:]) == text
    for L in (3, 9):
        ref = reference_encode(acts[L], ts.layers[L])
        for pos in rep.positions:
            got = rep.top(0, L, pos)
            want = ref[pos].topk(min(4, int((ref[pos] > 0).sum())))
            assert [i for i, _ in got] == want.indices.tolist()
            torch.testing.assert_close(torch.tensor([a for _, a in got]), want.values, rtol=1e-4, atol=1e-4)
    chat = feature_lens(real_gemma, ts, text, top_k=2, chat=True)
    assert chat.tokens[:2] == ["<bos>", "<start_of_turn>"] and chat.bos[0] and 0 not in chat.positions
