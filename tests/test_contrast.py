"""cltrace contrast: the statistics against direct computations (exact permutation p-values by
enumeration, Monte Carlo p-values from the same relabellings, the Benjamini-Hochberg step,
Hedges' g), then a tiny model with a planted feature that fires only on set A's prompts: the
command ranks it first with a significant q-value, writes each set's common circuit, rebuilds
the same ranking from the stored graphs, refuses bad input before tracing; the report page in
headless Chromium."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import numpy as np
import pytest

from cltrace.batch.prompts import read_prompts
from cltrace.batch.store import Store
from cltrace.cli import main
from cltrace.contrast.report import load_sets
from cltrace.contrast.stats import bh_qvalues, hedges_g, permutation_p, relabellings
from support import contrast as P
from support.contrast import planted, planted_model  # noqa: F401  (fixtures)


def _direct_p(x, n_a, splits):
    """|mean_A - mean_B| of each split (an index tuple of set A) against the observed one."""
    obs = abs(x[:n_a].mean() - x[n_a:].mean())
    stats = []
    for idx in splits:
        a = [x[i] for i in idx]
        b = [x[i] for i in range(len(x)) if i not in idx]
        stats.append(abs(sum(a) / len(a) - sum(b) / len(b)))
    return [s >= obs - 1e-9 * max(abs(x).max(), 1e-300) for s in stats]


def test_exact_permutation_p_values_by_enumeration():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 6))
    x[:3, 0] += 4.0  # a real difference
    x[:, 1] = [1, 1, 1, 0, 0, 0, 0]  # ties: every relabelling as extreme as the observed one
    x[:, 2] = 0.0
    p = permutation_p(x, 3, n_perm=35)  # C(7, 3) = 35: exact
    splits = list(itertools.combinations(range(7), 3))
    for j in range(x.shape[1]):
        hits = _direct_p(x[:, j], 3, splits)
        assert p[j] == pytest.approx(sum(hits) / 35, abs=1e-15)
    assert p[0] == pytest.approx(1 / 35) and p[2] == 1.0
    assert p[1] == pytest.approx(1 / 35)  # only the observed split puts all three 1s in A


def test_monte_carlo_p_values_count_the_observed_split():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 4))
    x[:6, 0] += 2.0
    p = permutation_p(x, 6, n_perm=500, seed=7)  # C(12, 6) = 924 > 500: random relabellings
    rows, exact = relabellings(6, 6, 500, seed=7)
    assert not exact and rows.shape == (500, 12) and (rows.sum(1) == 6).all()
    splits = [tuple(np.flatnonzero(r)) for r in rows]
    for j in range(4):
        assert p[j] == pytest.approx((1 + sum(_direct_p(x[:, j], 6, splits))) / 501, abs=1e-15)
    assert (permutation_p(x, 6, n_perm=500, seed=7) == p).all()  # seeded


def test_benjamini_hochberg_against_the_definition():
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.uniform(0, 0.01, 5), rng.uniform(0, 1, 30), [0.02, 0.02, 1.0]])
    q = bh_qvalues(p)
    m = len(p)
    ranks = {i: 1 + sum(p[k] < p[i] or (p[k] == p[i] and k < i) for k in range(m)) for i in range(m)}
    for i in range(m):  # q_i = min over the p_j >= p_i of m p_j / rank_j, capped at 1
        direct = min(min(m * p[j] / ranks[j] for j in range(m) if ranks[j] >= ranks[i]), 1.0)
        assert q[i] == pytest.approx(direct, rel=1e-12)
    assert bh_qvalues(np.array([])).shape == (0,)


def test_hedges_g_against_the_formula():
    a, b = [1.0, 2.0, 4.0], [0.0, 1.0, 0.5, 1.5]
    x = np.array(a + b)[:, None]
    diff, g = hedges_g(x, 3)
    sp = math.sqrt((2 * np.var(a, ddof=1) + 3 * np.var(b, ddof=1)) / 5)
    assert diff[0] == pytest.approx(np.mean(a) - np.mean(b))
    assert g[0] == pytest.approx((np.mean(a) - np.mean(b)) / sp * (1 - 3 / (4 * 7 - 9)))
    const = np.array([[2.0], [2.0], [0.0], [0.0]])
    assert hedges_g(const, 2)[1][0] == np.inf and hedges_g(np.zeros((4, 1)), 2)[1][0] == 0.0


N, TRACE = P.N, P.TRACE


def test_planted_feature_ranks_first_and_significant(planted):
    report = json.loads((planted / "contrast.json").read_text())
    assert [s["name"] for s in report["sets"]] == ["a", "b"]
    assert [len(s["prompts"]) for s in report["sets"]] == [N, N] and report["failed"] == []
    top = report["features"][0]
    assert (top["layer"], top["feature"]) == (0, P.PLANT)
    assert top["significant"] and top["activation"]["q"] <= 0.05
    assert top["kept_share"] == [1.0, 0.0]
    assert top["activation"]["mean"][0] > 9.9 and top["activation"]["mean"][1] == 0.0
    assert top["activation"]["p"] == pytest.approx(report["settings"]["min_p"], rel=0.5) or top["activation"]["p"] < 1e-3
    assert top["influence"]["mean"][0] > 0 and top["influence"]["mean"][1] == 0.0
    ps = [r["activation"]["q"] for r in report["features"]]
    assert ps == sorted(ps)  # ranked by q
    # the common circuit of set A keeps the planted feature at the last position; B's does not
    ca, cb = (json.loads((planted / f"common-{s}.json").read_text()) for s in "ab")
    assert [n for n in ca["nodes"] if n["jsNodeId"] == f"0_{P.PLANT}-0"]
    assert not [n for n in cb["nodes"] if n["jsNodeId"] == f"0_{P.PLANT}-0"]
    ids = {n["node_id"] for n in ca["nodes"]}
    assert ca["links"] and all(l["source"] in ids and l["target"] in ids for l in ca["links"])
    assert ca["metadata"]["info"]["common_circuit"] == {"prompts": N, "min_share": 0.5, "min_count": N // 2}


def test_rerun_resumes_and_traces_nothing_again(planted, planted_model, monkeypatch, capsys):
    before = json.loads((planted / "contrast.json").read_text())
    P.use_planted(monkeypatch, *planted_model)
    a, b = (planted.parent / f"{s}.jsonl" for s in "ab")
    assert main(["contrast", str(a), str(b), "--out", str(planted), *TRACE]) == 0
    assert f"0 ok, 0 failed, {2 * N} skipped" in capsys.readouterr().out
    records = [json.loads(l) for l in (planted / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 * N and len({r["slug"] for r in records}) == 2 * N  # each prompt once
    assert json.loads((planted / "contrast.json").read_text())["features"] == before["features"]


def test_report_rebuilds_from_the_stored_graphs(planted, capsys):
    before = json.loads((planted / "contrast.json").read_text())
    assert main(["contrast", "--report", str(planted), "--min-share", "1.0"]) == 0
    after = json.loads((planted / "contrast.json").read_text())
    assert after["features"] == before["features"]
    assert "L0 #7" in capsys.readouterr().out
    full = json.loads((planted / "common-a.json").read_text())
    assert full["metadata"]["info"]["common_circuit"]["min_count"] == N


def test_the_folder_keeps_each_sets_prompts(planted):
    names, sets = load_sets(Store(str(planted)))
    a, b = (read_prompts(planted.parent / f"{s}.jsonl") for s in "ab")
    assert names == ["a", "b"]
    assert sets == [[dataclasses.replace(s, slug=f"{n}-{s.slug}") for s in ss] for n, ss in zip("ab", (a, b))]


@pytest.mark.parametrize("case, message", [
    ("column", "line 2: unknown column 'lable'"),
    ("small", "set 'a' has 3 prompts: a permutation test against 3 prompts cannot reach p <= 0.05"),
    ("labels", "'label' must take exactly two values, found 3"),
    ("nolabel", "prompt 'the-cat-sat-q' has no 'label'"),
])
def test_bad_input_is_one_line_before_tracing(tmp_path, capsys, monkeypatch, case, message):
    import cltrace.models

    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: pytest.fail("it started tracing"))
    a, b = P.write_sets(tmp_path)
    if case == "column":
        lines = a.read_text().splitlines()
        lines[1] = json.dumps({"prompt": "x", "lable": "a"})
        a.write_text("\n".join(lines) + "\n")
    elif case == "small":  # 3 against 3: p >= 2/20
        a, b = P.write_sets(tmp_path, n=3)
    argv = [str(a), str(b)]
    if case in ("labels", "nolabel"):
        one = tmp_path / "one.jsonl"
        rows = [{"prompt": p, "label": "abc"[i % 3]} for i, p in enumerate(P.SET_A)]
        if case == "nolabel":
            rows[0].pop("label")
        one.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv = [str(one)]
    out = tmp_path / "out"
    assert main(["contrast", *argv, "--out", str(out), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing traced, nothing written


def test_one_file_with_labels_splits_the_sets(tmp_path):
    from argparse import Namespace

    from cltrace.commands.contrast import read_sets

    one = tmp_path / "one.jsonl"
    rows = [{"prompt": p, "label": "past" if i % 2 else "present"} for i, p in enumerate(P.SET_A)]
    one.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names, sets = read_sets(Namespace(sets=[str(one)], chat=False, names=None, n_perm=10000, alpha=0.05))
    assert names == ["present", "past"]
    assert [s.prompt for s in sets[0]] == P.SET_A[0::2] and [s.prompt for s in sets[1]] == P.SET_A[1::2]
    assert all(s.slug.startswith("present-") for s in sets[0]) and all(s.slug.startswith("past-") for s in sets[1])


@pytest.mark.browser
def test_report_page_in_a_browser(planted, planted_model, monkeypatch):
    """/contrast.html of the planted folder: the plots and the ranked table drawn, the planted
    feature first, its card opens, the common-circuit links open in the viewer; with the
    ablation.json of `cltrace steer --contrast`, its section: a table per set (the prompts,
    mean before/after, change, interval, p) and a line per prompt before -> after; no JS
    error, no request off the server; the report and the ablation are not listed as graphs,
    the common circuits are."""
    import urllib.request

    from support.serve import browser_missing, cleanup, launch_chromium, serving, watch_page

    why = browser_missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    P.use_planted(monkeypatch, *planted_model)
    assert main(["steer", "--contrast", str(planted), "--top", "1", "--metric", 'logit-diff:"x","y"',
                 "--resamples", "500", "--quiet"]) == 0
    ablation = json.loads((planted / "ablation.json").read_text())
    with serving(planted) as url, sync_playwright() as pw:
        graphs = {g["path"] for g in json.loads(urllib.request.urlopen(f"{url}/api/graphs").read())["graphs"]}
        assert "contrast.json" not in graphs and {"common-a.json", "common-b.json"} <= graphs
        assert "ablation.json" not in graphs
        ctx, profile = launch_chromium(pw)
        try:
            pg = ctx.new_page()
            errors, foreign = watch_page(pg, url)
            pg.goto(f"{url}/contrast.html")
            pg.wait_for_function("document.body.dataset.ready === '1'", timeout=15000)
            report = json.loads((planted / "contrast.json").read_text())
            assert pg.locator("#contrast-table tbody tr").count() == len(report["features"])
            assert pg.locator("#volcano circle.dot").count() == len(report["features"])
            assert pg.locator("#top-bars rect.set-bar").count() == 2 * min(12, len(report["features"]))
            first = pg.locator("#contrast-table tbody tr").first
            assert f"L0 #{P.PLANT}" in first.inner_text()
            # the ablation section: one table per set, a line per prompt, the summaries
            assert pg.locator("#ablation").is_visible()
            assert pg.locator("#ablation-plot line.prompt-line").count() == 2 * N
            assert pg.locator("#ablation-plot line.mean-line").count() == 2
            assert pg.locator("table.ablation-table").count() == 2
            for i, s in enumerate(ablation["sets"]):
                table = pg.locator(f"#ablation-table-{i}")
                assert table.locator("tbody tr").count() == N
                foot = table.locator("tfoot").inner_text()
                sm = s["summary"]
                assert f"{sm['mean_before']:.4f}" in foot and f"{sm['mean_after']:.4f}" in foot
                assert f"{sm['mean_change']:.4f}" in foot and f"[{sm['ci_low']:.4f}, {sm['ci_high']:.4f}]" in foot
                assert "paired sign-flip test" in foot
            assert f"0:{P.PLANT}=0" in pg.locator("#ablation-summary").inner_text()
            first.locator("a").click()
            pg.wait_for_selector("#feature-body h3.feature-label")
            assert f"feature {P.PLANT}" in pg.locator("#feature-body").inner_text()
            pg.locator("#common-links a").first.click()
            pg.wait_for_function("document.body.dataset.ready === '1' && location.hash.includes('common-a')", timeout=15000)
            assert pg.locator("svg g.nodes > *").count() > 0 or pg.locator("svg circle").count() > 0
            assert errors == [] and foreign == []
        finally:
            ctx.close()
            cleanup(profile)
