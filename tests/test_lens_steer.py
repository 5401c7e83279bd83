"""Steering SAE latents from the lens page: POST /api/steer_sae equals generate(SaeSteering)
called directly; bad requests answer 400 (or 409 without --sae) with a message; the page in a
browser."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch

from support.lens import LENS_TOKENS, lens_setup
from support.serve import http_json as http, serving


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder with lens.json of the resid_post and mlp_out SAEs, model, {site: set})."""
    from cltrace.lens import feature_lens

    tmp = tmp_path_factory.mktemp("lens_steer")
    model, sets = lens_setup(tmp)
    root = tmp / "served"
    root.mkdir()
    rep = feature_lens(model, [sets["resid_post"], sets["mlp_out"]], torch.tensor(LENS_TOKENS),
                       top_k=4, bos_token_id=2)
    (root / "lens.json").write_text(json.dumps(rep.to_json(), separators=(",", ":")))  # as cltrace lens writes
    return root, model, sets


@pytest.fixture(scope="module")
def steerer(setup):
    from cltrace.steering import SaeSteering

    _, model, sets = setup
    return SaeSteering(model, sets["resid_post"])


def test_answer_equals_generate(setup, steerer):
    """For each op and positions choice, the server's continuations and next-token
    probabilities are those of generate / logits on the lens's token ids."""
    from cltrace.steering import Intervention, generate

    root, _, sets = setup
    lens = json.loads((root / "lens.json").read_text())
    name = lens["sets"][0]["name"]
    assert lens["sets"][0]["site"] == "resid_post"
    ids = torch.tensor([t["id"] for t in lens["tokens"]])
    with serving(root, saes=[steerer]) as url:
        info = http(f"{url}/api/sae")[1]
        assert info["available"] and info["sets"][0]["site"] == "resid_post"
        before = generate(steerer, ids, [], max_new_tokens=6, seed=0)
        for op, value, where, pos in [("add", 8.0, "all", None), ("set", 5.0, "from", 4),
                                      ("add", -6.0, "prompt", None)]:
            req = {"lens": "lens.json", "set": name, "layer": 1, "latent": 3, "op": op,
                   "value": value, "positions": where, "pos": pos, "max_new_tokens": 6}
            status, out = http(f"{url}/api/steer_sae", req)
            assert status == 200, out
            iv = Intervention(1, 3, pos=None if pos is None else slice(pos, None), **{op: value})
            after = generate(steerer, ids, [iv], max_new_tokens=6, seed=0,
                             steer_generated=where != "prompt")
            assert out["intervention"] == str(iv)
            assert out["tokens"] == {"before": before.new_tokens.tolist(), "after": after.new_tokens.tolist()}
            assert out["continuation"]["after"] == " ".join(f"#{t}" for t in after.new_tokens.tolist())
            p0 = torch.softmax(steerer.logits(ids)[-1].double(), -1)
            p1 = torch.softmax(steerer.logits(ids, [iv])[-1].double(), -1)
            assert len(out["top"]) >= 10
            for row in out["top"]:
                assert row["before"] == pytest.approx(float(p0[row["token"]]), abs=1e-9)
                assert row["after"] == pytest.approx(float(p1[row["token"]]), abs=1e-9)
        assert any(abs(r["after"] - r["before"]) > 1e-4 for r in out["top"])  # it steers


def test_bad_requests(setup, steerer):
    root, _, sets = setup
    lens = json.loads((root / "lens.json").read_text())
    name, other = lens["sets"][0]["name"], lens["sets"][1]["name"]
    good = {"lens": "lens.json", "set": name, "layer": 1, "latent": 3, "op": "add", "value": 4,
            "positions": "all", "max_new_tokens": 2}
    with serving(root) as url:  # no --sae: 409 saying how to start serve
        status, out = http(f"{url}/api/steer_sae", good)
        assert status == 409 and "--sae" in out["error"]
        assert http(f"{url}/api/sae")[1] == {"available": False}
    with serving(root, saes=[steerer]) as url:
        cases = [({"set": other}, f"--sae {other}"),  # the lens's mlp_out set is not loaded
                 ({"set": "nope"}, "no set named"),
                 ({"layer": 7}, "layer 7"),
                 ({"latent": 40}, "latent 40 is out of range"),
                 ({"op": "scale"}, "op must be"),
                 ({"value": "x"}, "value must be"),
                 ({"positions": "some"}, "positions must be"),
                 ({"positions": "from", "pos": 99}, "pos 99 is out of range"),
                 ({"positions": "from"}, "pos must be an integer"),
                 ({"max_new_tokens": 1000}, "max_new_tokens"),
                 ({"lens": 3}, "name the lens")]
        for change, needle in cases:
            status, out = http(f"{url}/api/steer_sae", {**good, **change})
            assert status == 400 and needle in out["error"], (change, out)
        (root / "notlens.json").write_text('{"nodes": []}')
        status, out = http(f"{url}/api/steer_sae", {**good, "lens": "notlens.json"})
        assert status == 400 and "not a lens JSON" in out["error"]
        assert http(f"{url}/api/steer_sae", {**good, "lens": "../lens.json"})[0] == 404
        req = urllib.request.Request(f"{url}/api/steer_sae", data=json.dumps(good).encode(),
                                     headers={"Content-Type": "text/plain"})
        with pytest.raises(urllib.error.HTTPError) as e:  # the shared guard: JSON only
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 403


def test_cli_refuses_a_set_that_is_not_saes(setup, tmp_path, capsys):
    """``cltrace serve --sae`` of a crosscoder: one line, exit 2, before any model loads."""
    from cltrace.cli import main

    root, _, sets = setup
    assert main(["serve", str(root), "--sae", sets["crosscoder"].source, "--port", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "crosscoder" in err[0]


@pytest.mark.browser
def test_lens_page_steers_in_a_browser(setup, steerer):
    """The lens page of a server with a tiny model and the resid_post SAEs: a click on a cell,
    then steer: the before/after continuations drawn are the server's; no JS error, no
    request off the server."""
    from support.serve import browser_missing, cleanup, launch_chromium, watch_page

    why = browser_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    root, _, _ = setup
    with serving(root, saes=[steerer]) as url, sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        try:
            pg = ctx.new_page()
            errors, foreign = watch_page(pg, url)
            pg.goto(f"{url}/lens.html")
            pg.wait_for_function("['1', 'error'].includes(document.body.dataset.ready)", timeout=15000)
            assert errors == [] and pg.locator("#error").is_hidden(), (errors, pg.locator("#error").inner_text())
            pg.locator('td.lens-cell[data-layer="1"][data-pos="3"]').click()
            assert not pg.locator("#steer-card").is_hidden()
            assert pg.locator("#steer-hint").is_hidden() and not pg.locator("#steer-run").is_disabled()
            pg.locator("#steer-value").fill("12")
            pg.locator("#steer-pos").select_option("from")
            pg.locator("#steer-tokens").fill("5")
            pg.locator("#steer-run").click()
            pg.wait_for_function("['done', 'error'].includes(document.body.dataset.steer)", timeout=30000)
            assert pg.locator("#steer-error").is_hidden(), pg.locator("#steer-error").inner_text()
            lens = json.loads((root / "lens.json").read_text())
            lat = next(c for c in lens["cells"] if c["set"] == 0 and c["layer"] == 1 and c["pos"] == 3)["latents"][0]
            _, out = http(f"{url}/api/steer_sae", {"lens": "lens.json", "set": lens["sets"][0]["name"], "layer": 1,
                                                  "latent": lat["index"], "op": "add", "value": 12, "positions": "from",
                                                  "pos": 3, "max_new_tokens": 5})
            assert pg.locator("#steer-before").inner_text() == out["continuation"]["before"]
            assert pg.locator("#steer-after").inner_text() == out["continuation"]["after"]
            assert pg.locator("#steer-top tr").count() == 1 + len(out["top"])
            assert errors == [] and foreign == []
        finally:
            ctx.close()
            cleanup(profile)
