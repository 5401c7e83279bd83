"""``cltrace steer --contrast DIR --top K --metric M``: the causal check of a contrast report on
the tiny model with a planted feature (tests/support/contrast.py: layer-0 feature PLANT fires
only at the last position of set A's prompts and writes the 'x' logit up). Ablating the top
feature (PLANT) moves logit('x') - logit('y') on every A prompt and leaves every B prompt
exactly as it was; each prompt's before and after equal a direct computation (the model run by
hand, with and without -a x the decoder row added to the MLP output it writes); bad input is
one line before the model loads; on Ray (2 actors) the rows equal the local loop's."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

from cltrace.batch.store import Store
from cltrace.cli import main
from cltrace.contrast.report import load_sets
from support import contrast as P
from support.contrast import planted, planted_model  # noqa: F401  (fixtures)

N = P.N

METRIC = 'logit-diff:"x","y"'


def direct_logit_diff(rm, tok, text: str, ablate: bool) -> float:
    """logit('x') - logit('y') at the last position of ``text``, the model run by hand: with
    ``ablate``, PLANT's activation a (JumpReLU of layer 0's MLP input, read by a hook) times
    its decoder row is taken off the output of the MLP it writes (layer n_out - 1)."""
    parts = rm.parts
    tc = rm.transcoders.layers[0]
    ids = torch.tensor(tok(text)["input_ids"])  # [n_pos], <bos> first
    x_, y_ = (tok(c, add_special_tokens=False)["input_ids"][0] for c in "xy")
    seen = {}

    def grab(_m, _a, out):
        seen["x"] = out[0]  # [n_pos, d_model]

    def take_off(_m, _a, out):
        z = seen["x"].double() @ tc.W_enc[:, P.PLANT].double() + float(tc.b_enc[P.PLANT])  # [n_pos]
        a = torch.where(z > float(tc.threshold[P.PLANT]), z, torch.zeros_like(z))
        a[0] = 0.0  # <bos> carries no features
        return out - (a[:, None] * tc.W_dec[P.PLANT, tc.n_out - 1].double())[None].to(out.dtype)

    hooks = [parts.layers[0].pre_feedforward_layernorm.register_forward_hook(grab)]
    if ablate:
        hooks.append(parts.layers[tc.n_out - 1].post_feedforward_layernorm.register_forward_hook(take_off))
    try:
        with torch.no_grad():
            logits = rm.model(input_ids=ids[None], use_cache=False).logits[0, -1].double()  # [vocab]
    finally:
        for h in hooks:
            h.remove()
    return float(logits[x_] - logits[y_])


def test_ablating_the_top_feature_moves_set_a_only(planted, planted_model, monkeypatch, capsys):
    rm, tok = planted_model
    P.use_planted(monkeypatch, rm, tok)
    assert main(["steer", "--contrast", str(planted), "--top", "1", "--metric", METRIC,
                 "--resamples", "2000", "--quiet"]) == 0
    out = capsys.readouterr().out
    data = json.loads((planted / "ablation.json").read_text())
    assert data["format"] == "cltrace.ablation/1" and data["metric"] == METRIC and data["op"] == "=0"
    assert [(f["layer"], f["feature"], f["rank"]) for f in data["features"]] == [(0, P.PLANT, 1)]
    assert data["interventions"] == [f"0:{P.PLANT}=0"] and data["note"] is None
    (na, a), (nb, b) = ((s["name"], s) for s in data["sets"])
    assert (na, nb) == ("a", "b") and [len(a["prompts"]), len(b["prompts"])] == [N, N]
    # A: every prompt moves (the 'x' logit loses PLANT's push); B: nothing moves at all
    assert all(r["change"] < -0.5 for r in a["prompts"]), a["prompts"]
    assert all(r["after"] == r["before"] and r["change"] == 0.0 for r in b["prompts"])
    sa, sb = a["summary"], b["summary"]
    assert sa["p_value"] == pytest.approx(2 / 2 ** N) and sa["p_exact"] and sa["ci_high"] < 0
    assert sb["mean_change"] == 0.0 and sb["p_value"] == 1.0 and sb["ci_low"] == sb["ci_high"] == 0.0
    # each prompt's before / after against the model run by hand, and so the means
    texts = {spec.slug: spec.prompt for specs in load_sets(Store(str(planted)))[1] for spec in specs}
    assert sorted(texts.values()) == sorted(P.SET_A[:N] + P.SET_B[:N])
    for s in (a, b):
        for r in s["prompts"]:
            text = texts[r["slug"]]
            assert r["before"] == pytest.approx(direct_logit_diff(rm, tok, text, False), abs=1e-5)
            assert r["after"] == pytest.approx(direct_logit_diff(rm, tok, text, True), abs=1e-5)
        direct = [direct_logit_diff(rm, tok, texts[r["slug"]], True) - direct_logit_diff(rm, tok, texts[r["slug"]], False)
                  for r in s["prompts"]]
        assert s["summary"]["mean_change"] == pytest.approx(sum(direct) / N, abs=1e-5)
    assert "set 'a' (8 prompts):" in out and "change -" in out
    assert "intervening on 1 feature(s)" in out and f"L0 #{P.PLANT} (rank 1)" in out


def test_fewer_significant_than_asked_is_said(planted, planted_model, monkeypatch, capsys, tmp_path):
    """--top 50: only the significant features are taken, and the note says how many; the
    first is PLANT; --op @-1=0 ablates at the last position only (the same A change: PLANT
    fires only there)."""
    report = json.loads((planted / "contrast.json").read_text())
    n_sig = sum(r["significant"] for r in report["features"])
    assert 1 <= n_sig < 50
    folder = _copy_report(planted, tmp_path)
    P.use_planted(monkeypatch, *planted_model)
    assert main(["steer", "--contrast", str(folder), "--top", "50", "--op", "@-1=0", "--metric", METRIC,
                 "--resamples", "200", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"note: only {n_sig} of the top 50 asked for: {n_sig} features are significant" in out
    data = json.loads((folder / "ablation.json").read_text())
    assert len(data["features"]) == n_sig and all(f["significant"] for f in data["features"])
    assert data["interventions"][0] == f"0:{P.PLANT}@-1=0" and data["note"].startswith(f"only {n_sig}")


def _copy_report(planted, tmp_path):
    """contrast.json and contrast-sets.json of the planted folder in a folder of their own."""
    folder = tmp_path / "report"
    folder.mkdir()
    for name in ("contrast.json", "contrast-sets.json"):
        (folder / name).write_bytes((planted / name).read_bytes())
    return folder


@pytest.mark.parametrize("case, argv, message", [
    ("nofolder", ["--top", "1"], "no contrast.json (make one with cltrace contrast"),
    ("top0", ["--top", "0"], "--top must be >= 1, got 0"),
    ("nosig", ["--top", "2"], "has no significant feature (q <= 0.05); --all-ranked"),
    ("prompts", ["--prompts", "x.jsonl"], "give --prompts SET or --contrast DIR, not both"),
    ("op", ["--op", "=zero"], "--op '=zero'"),
    ("workers", ["--workers", "2"], "give --ray [ADDRESS] too"),
])
def test_bad_input_is_one_line_before_the_model_loads(planted, tmp_path, monkeypatch, capsys,
                                                      case, argv, message):
    import cltrace.models

    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    folder = _copy_report(planted, tmp_path)
    if case == "nofolder":
        (folder / "contrast.json").unlink()
    if case == "nosig":
        report = json.loads((folder / "contrast.json").read_text())
        for r in report["features"]:
            r["significant"] = False
        (folder / "contrast.json").write_text(json.dumps(report))
    assert main(["steer", "--contrast", str(folder), "--metric", METRIC, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (folder / "ablation.json").exists()


def test_a_metric_token_of_several_tokens_is_refused(planted, planted_model, monkeypatch, capsys, tmp_path):
    """'xy' is two tokens: one line, exit 2, before any prompt is measured, nothing written
    (checked with the tokenizer, which comes with the model)."""
    folder = _copy_report(planted, tmp_path)
    P.use_planted(monkeypatch, *planted_model)
    assert main(["steer", "--contrast", str(folder), "--metric", 'logit-diff:"xy","z"', "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'xy' is 2 tokens, not one" in err[0], err
    assert not (folder / "ablation.json").exists()


@pytest.mark.ray
def test_ray_rows_equal_the_local_loop(planted, planted_model, tmp_path, monkeypatch, capsys):
    """2 Ray actors, each loading the saved planted model once: the rows and summaries of both
    sets equal the local loop's exactly (run_sets_ray and the CLI's --ray), for --contrast and
    for --prompts."""
    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    import cltrace
    import cltrace.commands.steer_set as steer_cmd
    from cltrace.steering.ablation import AblationSettings, select_features
    from cltrace.steering.metrics import parse_metric
    from cltrace.steering.prompt_set import run_set
    from cltrace.steering.set_ray import run_sets_ray
    from support.batch import load_tiny

    path = P.save_planted(tmp_path / "planted.pt")
    loader = functools.partial(load_tiny, str(path))
    rm, tok = loader()
    torch.set_num_threads(1)  # as each actor (2 CPUs, 2 actors): the same float32 sums
    names, sets = load_sets(Store(str(planted)))
    report = json.loads((planted / "contrast.json").read_text())
    feats, _ = select_features(report, AblationSettings(top=3))
    ivs = steer_cmd.ablation_interventions(feats, "=0")
    metric = parse_metric(METRIC)
    local = [run_set(rm, tok, specs, metric, ivs, n_resamples=500) for specs in sets]

    here = Path(__file__).parent
    package_root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(here), package_root, os.environ.get("PYTHONPATH", "")])}})
    try:
        remote = run_sets_ray(loader, sets, metric, ivs, workers=2, n_resamples=500)
        for lo, re_ in zip(local, remote):
            assert [r.to_dict() for r in re_.rows] == [r.to_dict() for r in lo.rows]
            assert re_.summary == lo.summary and re_.interventions == lo.interventions
        assert any(r.after != r.before for r in remote[0].rows)
        # the command: --contrast and --prompts with --ray, actors loading the same file
        monkeypatch.setattr(steer_cmd, "worker_loader", lambda args, ivs, images=False: loader)
        folder = _copy_report(planted, tmp_path)
        assert main(["steer", "--contrast", str(folder), "--top", "3", "--metric", METRIC,
                     "--resamples", "500", "--ray", "--workers", "2", "--quiet"]) == 0
        data = json.loads((folder / "ablation.json").read_text())
        for s, lo in zip(data["sets"], local):
            assert s["prompts"] == [r.to_dict() for r in lo.rows]
            assert s["summary"] == lo.summary.to_dict()
        prompts = tmp_path / "a.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in P.SET_A[:5]))
        out = tmp_path / "r.json"
        assert main(["steer", "--prompts", str(prompts), "-f", f"0:{P.PLANT}=0", "--metric", METRIC,
                     "--resamples", "500", "--ray", "--workers", "2", "--out", str(out), "--quiet"]) == 0
        from cltrace.batch.prompts import read_prompts

        want = run_set(rm, tok, read_prompts(prompts), metric, [steer_cmd.parse_feature(f"0:{P.PLANT}=0")],
                       n_resamples=500)
        assert json.loads(out.read_text())["prompts"] == [r.to_dict() for r in want.rows]
    finally:
        ray.shutdown()
