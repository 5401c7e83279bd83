"""``cltrace lens --image``: the feature lens of an image + text prompt on the tiny random
multimodal Gemma 3 (:mod:`support.tiny_gemma_vision`, saved in the hub layout).

The oracle is transformers' own ``Gemma3ForConditionalGeneration`` of the same saved folder,
fed the processor's inputs (``token_type_ids``: its bidirectional image mask), its site
activations read by plain forward hooks and encoded by hand (``relu(x W + b) * (pre >
threshold)``): every reported latent and activation, at text and image positions, and every
image map (a latent's activation at each patch), equals it. The same model run without the
image mask (causal everywhere) differs at image positions far beyond rounding, so the lens is
shown to use the bidirectional mask. The text path is the one it was (bit for bit). The CLI:
the table and per-image summary, the JSON with the image copied beside it (the graph export's
entries), bad input as one line before the model loads; the lens page draws the image with a
heatmap that follows the selected latent in headless Chromium.
"""
from __future__ import annotations

import json

import pytest
import torch

from cltrace.cli import main
from cltrace.lens import feature_lens
from cltrace.models.anatomy import text_parts
from cltrace.models.multimodal import load_multimodal
from cltrace.models.sites import run_sites
from support.cli import one_line_error
from support.lens import (IMAGE_PROMPT, LM_SITES, hf_multimodal_sites, image_lens_setup,
                          reference_encode)
from support.serve import browser  # noqa: F401  (fixture)

K = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, transformers model, picture, {name: set}, LoadedMultimodal, prompt)."""
    root = tmp_path_factory.mktemp("lens-images")
    folder, hf, image, sets = image_lens_setup(root)
    lm = load_multimodal(folder, device="cpu", dtype=torch.float32)
    return folder, hf, image, sets, lm, lm.prompt(IMAGE_PROMPT, [str(image)])


@pytest.fixture(scope="module")
def report(setup):
    _, _, image, sets, lm, _ = setup
    return feature_lens(lm, list(sets.values()), IMAGE_PROMPT, images=[str(image)], top_k=K,
                        names=list(sets))


def _image_positions(prompt) -> list[int]:
    return torch.nonzero(prompt.image_groups[0] >= 0).flatten().tolist()


def test_run_sites_equal_transformers_and_need_the_image_mask(setup):
    """run_sites on the prompt's embeddings with its image groups: every site at every layer
    and position equals transformers' with the processor's image mask (fp32 rounding); with
    no image groups it equals transformers run causally, which differs at image positions."""
    _, hf, _, _, lm, prompt = setup
    parts = text_parts(lm.model)
    sites = [(s, L) for s in LM_SITES for L in range(parts.n_layers)]
    ours = run_sites(parts, None, sites, inputs_embeds=lm.embed(prompt), image_groups=prompt.image_groups)
    causal = run_sites(parts, None, sites, inputs_embeds=lm.embed(prompt))
    ref, ref_causal = hf_multimodal_sites(hf, prompt), hf_multimodal_sites(hf, prompt, bidirectional=False)
    img = _image_positions(prompt)
    before = list(range(img[0]))
    for s, L in sites:
        r = ref[s][L]  # [T, width]
        tol = 1e-5 * float(r.abs().max())
        assert (ours[(s, L)][0] - r).abs().max() <= tol, (s, L)
        assert (causal[(s, L)][0] - ref_causal[s][L]).abs().max() <= tol, (s, L)
        assert (ref_causal[s][L][before] - r[before]).abs().max() <= tol  # text before the image: same
    # the first soft token sees the later ones only through the image rule: it moves at every site
    gap = torch.stack([(ref[s][0][img[0]] - ref_causal[s][0][img[0]]).abs().max() / ref[s][0].abs().max()
                       for s in LM_SITES])
    assert (gap > 1e-2).all(), gap
    with pytest.raises(ValueError, match="exactly one"):
        run_sites(parts, prompt.input_ids, sites, inputs_embeds=lm.embed(prompt))


def test_lens_equals_transformers_at_image_and_text_positions(setup, report):
    """Every (set, layer, encoded position), soft tokens included: the lens's latents are the
    k largest active latents of the hand encode of transformers' site activation, in order,
    with their activations; every image map (a latent's activation at each patch, absent where
    it does not fire) and the image's top latents (by largest activation on the image) too."""
    _, hf, _, sets, lm, prompt = setup
    ref = hf_multimodal_sites(hf, prompt)
    img = _image_positions(prompt)
    assert report.tokens == lm.token_labels(prompt) and report.tokens[img[0]] == "<img 0,0>"
    assert report.token_ids == prompt.input_ids[0].tolist()
    assert report.positions == list(range(1, prompt.input_ids.shape[1]))  # all but <bos>
    [im] = report.images
    assert (im.rows, im.cols, im.first, im.file) == (2, 2, img[0], "picture.png") and im.positions == img
    checked = image_cells = mapped = 0
    for s, (name, ts) in enumerate(sets.items()):
        for L in ts.layers:
            dense = reference_encode(ref[ts.site_in][L], ts.layers[L])  # [T, d_sae]
            for pos in report.positions:
                got = report.top(s, L, pos)
                want = dense[pos].topk(min(K, int((dense[pos] > 0).sum())))
                assert [i for i, _ in got] == want.indices.tolist(), (name, L, pos)
                torch.testing.assert_close(torch.tensor([a for _, a in got]), want.values, rtol=1e-5, atol=1e-5)
                checked += 1
                image_cells += pos in img
            m = im.per_layer[(s, L)]
            on_image = dense[img]  # [4, d_sae]
            best = on_image.max(0).values  # [d_sae]
            fired = int((best > 0).sum())
            top = sorted(range(ts.d_sae), key=lambda i: (-float(best[i]), i))[:min(K, fired)]
            assert m.top == top, (name, L)
            shown = {i for pos in report.positions for i, _ in report.top(s, L, pos)}
            assert set(m.maps) == {i for i in shown | set(top) if best[i] > 0}
            for i, (patches, acts) in m.maps.items():
                assert patches == torch.nonzero(on_image[:, i] > 0).flatten().tolist()
                torch.testing.assert_close(torch.tensor(acts), on_image[patches, i], rtol=1e-5, atol=1e-5)
                mapped += 1
    assert checked == len(report.positions) * 4 * len(sets) and image_cells == 4 * 4 * len(sets)
    assert mapped > 50


def test_lens_differs_from_a_causal_mask_run(setup, report):
    """The latents at image positions are not those of the model run causally: the hand encode
    of transformers' causal activations differs from the lens's activations by far more than
    rounding at the first soft token of some set and layer (and at none of the text positions
    before the image)."""
    _, hf, _, sets, _, prompt = setup
    causal = hf_multimodal_sites(hf, prompt, bidirectional=False)
    img = _image_positions(prompt)
    moved = 0
    for s, (name, ts) in enumerate(sets.items()):
        for L in ts.layers:
            dense = reference_encode(causal[ts.site_in][L], ts.layers[L])
            for pos in range(1, img[-1] + 1):
                got = report.top(s, L, pos)
                want = dense[pos, [i for i, _ in got]]  # the causal run's activation of the same latents
                gap = (torch.tensor([a for _, a in got]) - want).abs().max() if got else torch.tensor(0.0)
                if pos < img[0]:
                    assert gap <= 1e-4, (name, L, pos)
                elif pos == img[0]:
                    moved += bool(gap > 1e-2)
    assert moved >= len(sets) * 3  # nearly every (set, layer) at the first soft token


def test_two_images(setup):
    """Two images (one a file, one an RGB tensor): soft tokens named <img i:r,c>, one entry
    per image at its own positions, each image's maps those of transformers' activations."""
    _, hf, image, sets, lm, _ = setup
    g = torch.Generator().manual_seed(3)
    pic = torch.randint(0, 256, (3, 40, 70), generator=g, dtype=torch.uint8)
    text = "the cat <start_of_image> sat on <start_of_image> a mat"
    ts = sets["mlp_out"]
    rep = feature_lens(lm, ts, text, images=[str(image), pic], top_k=K)
    prompt = lm.prompt(text, [str(image), pic])
    groups = prompt.image_groups[0]
    assert [im.file for im in rep.images] == ["picture.png", "image2"]
    dense = {L: reference_encode(hf_multimodal_sites(hf, prompt)["mlp_out"][L], ts.layers[L]) for L in ts.layers}
    for n, im in enumerate(rep.images):
        pos = torch.nonzero(groups == n).flatten().tolist()
        assert im.positions == pos and rep.tokens[pos[-1]] == f"<img {n + 1}:1,1>"
        for L in ts.layers:
            for i, (patches, acts) in im.per_layer[(0, L)].maps.items():
                col = dense[L][pos, i]
                assert patches == torch.nonzero(col > 0).flatten().tolist()
                torch.testing.assert_close(torch.tensor(acts), col[patches], rtol=1e-5, atol=1e-5)
    lines = rep.table().splitlines()
    assert sum("<image 1>" in ln for ln in lines) == sum("<image 2>" in ln for ln in lines) == 1
    assert "image 2 (image2): 2x2 soft tokens" in rep.image_table()


def test_text_path_unchanged(setup):
    """A text prompt on the same language model: run_sites on token ids gives what it gave
    before images existed, bit for bit (the pass on ``input_ids``; its embeddings passed as
    ``inputs_embeds`` agree too), and the lens of the text has no images."""
    _, _, _, sets, lm, _ = setup
    parts = text_parts(lm.model)
    ids = lm.tokenizer("the cat sat on a mat", return_tensors="pt")["input_ids"]
    sites = [(s, L) for s in LM_SITES for L in range(parts.n_layers)]
    got = run_sites(parts, ids, sites)
    with torch.no_grad():
        rec = {}
        hooks = [parts.layers[L].register_forward_hook(lambda m, a, o, L=L: rec.__setitem__(L, o.detach()))
                 for L in range(parts.n_layers)]
        try:
            lm.model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
    for L in range(parts.n_layers):
        assert torch.equal(got[("resid_post", L)], rec[L])
    embeds = run_sites(parts, None, sites, inputs_embeds=parts.embed(ids))
    assert all(torch.equal(got[k], embeds[k]) for k in sites)
    rep = feature_lens(lm, sets["resid_post"], "the cat sat on a mat", top_k=2)
    assert rep.images == [] and "images" not in rep.to_json()


def test_table_and_json(setup, report):
    """The table: text tokens line by line, the image's soft tokens one line; the per-image
    summary: per set and layer the image's top latents, the patches each fires on and the
    strongest ones; the JSON's images: the graph export's entries plus the maps."""
    from cltrace.export.images import image_entries

    _, _, _, sets, lm, prompt = setup
    [im] = report.images
    lines = report.table().splitlines()
    soft = [ln for ln in lines if "<img" in ln]
    assert soft == [] and sum("<image 1>" in ln for ln in lines) == 1
    assert any(ln.lstrip().startswith(f"{im.first}-{im.first + 3}") and "2x2 patches of picture.png" in ln
               for ln in lines)
    assert sum("<img" in ln for ln in report.table(patches=True).splitlines()) == 4
    summary = report.image_table(patches=2).splitlines()
    assert summary[0].startswith("image 1 (picture.png): 2x2 soft tokens at positions")
    m = im.per_layer[(0, 0)]
    i = m.top[0]
    (k1, a1), *_ = m.top_patches(i, 2)
    r, c = im.cell(k1)
    row = next(ln for ln in summary[2:] if ln.split()[:3] == ["0", "0", str(i)])
    assert f"{len(m.maps[i][0])}/4" in row and f"{r},{c}:{a1:.2f}" in row
    data = json.loads(json.dumps(report.to_json(image_files=["x.image1.png"])))
    [e] = data["images"]
    assert {k: e[k] for k in ("file", "grid", "positions")} == image_entries(
        prompt.image_groups[0], report.tokens, ["x.image1.png"])[0]
    assert len(e["layers"]) == sum(len(ts.layers) for ts in sets.values())
    x = next(y for y in e["layers"] if (y["set"], y["layer"]) == (0, 0))
    assert x["top"] == m.top and {d["index"]: d["patches"] for d in x["maps"]} == {j: p for j, (p, _) in m.maps.items()}


def _dict_args(sets):
    return [a for ts in sets for a in ("--dict", ts.source)]


def test_cli(setup, report, tmp_path, capsys):
    """cltrace lens --image --json: the table, the per-image summary (--top-patches), the image
    copied beside the JSON and named in it, cells and maps those of the Python API; with no
    placeholder the image goes first; --chat puts it in the user turn."""
    folder, _, image, sets, lm, _ = setup
    js = tmp_path / "out" / "pic.json"
    js.parent.mkdir()
    chosen = [sets["resid_post"], sets["transcoder"]]
    rc = main(["lens", IMAGE_PROMPT, "--model", str(folder), *_dict_args(chosen), "--image", str(image),
               "--top-k", str(K), "--top-patches", "1", "--json", str(js), "--device", "cpu", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert "(1 image(s): 4 soft tokens)" in out.splitlines()[0]
    assert "image 1 (picture.png): 2x2 soft tokens" in out and "its 1 strongest patches" in out
    assert (js.parent / "pic.image1.png").read_bytes() == image.read_bytes()
    data = json.loads(js.read_text())
    api = feature_lens(lm, chosen, IMAGE_PROMPT, images=[str(image)], top_k=K,
                       names=[ts.source for ts in chosen]).to_json(image_files=["pic.image1.png"])
    assert data["cells"] == api["cells"] and data["images"] == api["images"] and data["tokens"] == api["tokens"]
    assert data["images"][0]["file"] == "pic.image1.png"

    assert main(["lens", "the cat sat", "--model", str(folder), *_dict_args(chosen[:1]), "--image", str(image),
                 "--device", "cpu", "--quiet", "--all-patches"]) == 0
    out = capsys.readouterr().out
    first = lm.prompt("<start_of_image> the cat sat", [str(image)])
    assert sum("<img" in ln for ln in out.splitlines()) == 4  # one line per soft token
    assert f"positions {_image_positions(first)[0]}-" in out
    assert main(["lens", "the cat sat", "--chat", "--model", str(folder), *_dict_args(chosen[:1]),
                 "--image", str(image), "--device", "cpu", "--quiet"]) == 0
    chat = lm.prompt("<start_of_image> the cat sat", [str(image)], chat=True).input_ids
    assert chat.shape[1] != first.input_ids.shape[1]
    assert capsys.readouterr().out.startswith(f"lens of {chat.shape[1]} tokens (1 image(s)")


def test_cli_bad_image_inputs(setup, tmp_path, capsys, monkeypatch):
    """Not an image, a text-only model, placeholders that do not match, the starter set, a
    bad --top-patches: one line, exit 2, nothing written, the model never loaded."""
    import cltrace.models
    import cltrace.models.multimodal

    folder, _, image, sets, _, _ = setup

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cltrace.models.multimodal, "load_multimodal", no_load)
    monkeypatch.setattr(cltrace.models, "load_model", no_load)
    out = tmp_path / "out"
    out.mkdir()
    notes = tmp_path / "notes.png"
    notes.write_text("not an image\n")
    sae = ["--dict", sets["resid_post"].source]
    cases = [
        (["x", "--model", str(folder), *sae, "--image", str(notes)], ["notes.png", "not an image"]),
        (["x", "--model", str(folder), *sae, "--image", str(tmp_path)], ["--image", "a folder"]),
        (["x", "--model", "gemma-3-270m", *sae, "--image", str(image)], ["text-only"]),
        (["a <start_of_image> b <start_of_image>", "--model", str(folder), *sae, "--image", str(image)],
         ["2 <start_of_image> placeholder(s) for 1 image(s)"]),
        (["x", "--model", str(folder), "--image", str(image)], ["--image needs --dict"]),
        (["x", "--model", str(folder), "--dict", "starter", "--image", str(image)], ["--image needs --dict"]),
        (["x", "--model", str(folder), *sae, "--image", str(image), "--top-patches", "0"], ["--top-patches"]),
    ]
    for args, needles in cases:
        rc = main(["lens", *args, "--quiet", "--json", str(out / "l.json")])
        assert rc == 2, args
        one_line_error(capsys, *needles)
        assert list(out.iterdir()) == [], args


def _served_lens(tmp_path, folder, sets, image):
    """(folder, lens dict): ``cltrace lens --image --json`` of the resid_post SAEs into
    ``tmp_path/served/pic.json`` (the image copied beside it)."""
    served = tmp_path / "served"
    served.mkdir()
    assert main(["lens", IMAGE_PROMPT, "--model", str(folder), "--dict", sets["resid_post"].source,
                 "--image", str(image), "--top-k", "3", "--json", str(served / "pic.json"),
                 "--device", "cpu", "--quiet"]) == 0
    return served, json.loads((served / "pic.json").read_text())


@pytest.mark.browser
def test_lens_page_draws_the_image_heatmap(tmp_path, browser):  # noqa: F811
    """cltrace serve of a lens --image JSON (a 4 x 4 soft-token grid): /lens.html draws the
    image from the server with one heatmap cell per soft token coloured by the selected
    latent's activation (cells where it does not fire blank); picking another latent changes
    the heatmap; a click on a patch opens that soft token's cell; no JS error, no foreign
    request; without --sae the steer card says what to start."""
    from support.serve import serving, watch_page

    root = tmp_path / "setup"
    folder, _, image, sets = image_lens_setup(root, image_size=112, soft_tokens=16)
    served, data = _served_lens(tmp_path, folder, sets, image)
    [e] = data["images"]
    assert e["grid"] == [4, 4]
    top_layer = max(data["sets"][0]["layers"])
    entry = next(x for x in e["layers"] if x["layer"] == top_layer)
    maps = {m["index"]: dict(zip(m["patches"], m["acts"])) for m in entry["maps"]}

    def fills(page):
        return page.eval_on_selector_all("#lens-image-list .icell", "cs => cs.map(c => [Number(c.dataset.k), c.dataset.v])")

    with serving(served) as url:
        page = browser.new_page()
        errors, foreign = watch_page(page, url)
        page.goto(f"{url}/lens.html")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
        assert page.is_visible("#lens-images") and page.evaluate("document.body.dataset.images") == "1"
        page.wait_for_function("document.querySelector('#lens-image-list img').complete")
        assert page.evaluate("document.querySelector('#lens-image-list img').naturalWidth") > 0
        assert page.locator("#lens-image-list .icell").count() == 16
        assert page.locator("th.lens-img").count() == 16  # narrow soft-token columns
        first = entry["top"][0]
        assert page.evaluate("document.body.dataset.imageLatent") == f"0:{top_layer}:{first}"
        want = {k: maps[first].get(k, 0) for k in range(16)}
        got = dict(fills(page))
        assert {k: float(v) for k, v in got.items()} == pytest.approx(want)
        other = entry["top"][1]
        page.click(f'#lens-image-list ul.image-top button[data-latent="{other}"]')
        page.wait_for_function(f"document.body.dataset.imageLatent === '0:{top_layer}:{other}'")
        got2 = {k: float(v) for k, v in fills(page)}
        assert got2 == pytest.approx({k: maps[other].get(k, 0) for k in range(16)}) and got2 != got
        k = max(maps[other], key=maps[other].get)
        page.click(f'#lens-image-list .icell[data-k="{k}"]')
        pos = e["positions"][0] + k
        page.wait_for_selector(f'td.lens-cell.selected[data-layer="{top_layer}"][data-pos="{pos}"]')
        assert not page.locator("#cell-card").is_hidden()
        assert page.eval_on_selector_all("#lens-image-list .icell.on", "cs => cs.map(c => Number(c.dataset.k))") == [k]
        assert page.is_visible("#steer-hint") and page.locator("#steer-run").is_disabled()  # no --sae
        assert errors == [] and foreign == []


@pytest.mark.browser
def test_lens_page_steers_an_image_lens(setup, tmp_path, browser):  # noqa: F811
    """``cltrace serve --sae`` on a multimodal model steers a latent of an image lens: the
    server replays the lens's tokens with the copy of its image, and its probabilities are
    transformers' with the latent's decoder row added by a plain hook at that layer's output
    from the clicked soft token on; the page (a click on a patch, then steer) shows the
    server's continuations; a text-only server refuses the lens in one message."""
    from cltrace.steering import SaeSteering
    from support.serve import http_json, serving, watch_page
    from support.tiny_gemma_vision import SOFT

    folder, hf, image, sets, lm, prompt = setup
    served, data = _served_lens(tmp_path, folder, sets, image)
    first = data["images"][0]["positions"][0]
    cell = next(c for c in data["cells"] if c["pos"] == first + 1 and c["latents"])
    L, lat = cell["layer"], cell["latents"][0]["index"]
    req = {"lens": "pic.json", "set": data["sets"][0]["name"], "layer": L, "latent": lat, "op": "add",
           "value": 6.0, "positions": "from", "pos": first + 1, "max_new_tokens": 3}
    st = SaeSteering(lm.model, sets["resid_post"], tokenizer=lm.tokenizer, images=lm)

    v = 6.0 * sets["resid_post"].layers[L].W_dec[lat, 0]  # [d_model]

    def add(_m, _a, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, first + 1:prompt.input_ids.shape[1]] += v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = hf.model.language_model.layers[L].register_forward_hook(add)
    try:
        with torch.no_grad():
            want = hf(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                      token_type_ids=(prompt.input_ids == SOFT).long()).logits[0, -1]
    finally:
        handle.remove()
    p1 = torch.softmax(want.double(), -1)

    with serving(served, saes=[st]) as url:
        status, out = http_json(f"{url}/api/steer_sae", req)
        assert status == 200, out
        assert len(out["top"]) >= 10 and any(abs(r["after"] - r["before"]) > 1e-4 for r in out["top"])
        for row in out["top"]:
            assert row["after"] == pytest.approx(float(p1[row["token"]]), abs=1e-6)
        page = browser.new_page()
        errors, foreign = watch_page(page, url)
        page.goto(f"{url}/lens.html")
        page.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
        page.locator(f'td.lens-cell[data-layer="{L}"][data-pos="{first + 1}"]').click()
        assert page.locator("#steer-hint").is_hidden() and not page.locator("#steer-run").is_disabled()
        page.locator("#steer-value").fill("6")
        page.locator("#steer-pos").select_option("from")
        page.locator("#steer-tokens").fill("3")
        page.locator("#steer-run").click()
        page.wait_for_function("['done', 'error'].includes(document.body.dataset.steer)", timeout=30000)
        assert page.locator("#steer-error").is_hidden(), page.locator("#steer-error").inner_text()
        assert page.locator("#steer-before").inner_text() == out["continuation"]["before"].strip()
        assert page.locator("#steer-after").inner_text() == out["continuation"]["after"].strip()
        assert errors == [] and foreign == []
        page.close()
    text_only = SaeSteering(lm.model, sets["resid_post"], tokenizer=lm.tokenizer)
    with serving(served, saes=[text_only]) as url:
        status, out = http_json(f"{url}/api/steer_sae", req)
    assert status == 400 and "multimodal --model" in out["error"]
