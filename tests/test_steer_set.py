"""The causal test on a set of prompts (cltrace.steering.prompt_set, .metrics, .stats):
a planted effect on the tiny Gemma 3, the statistics against direct computations, the
``cltrace steer --prompts`` command, and one run on the real Gemma 3 270M (``real_model``)."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from cltrace.batch.prompts import read_prompts
from cltrace.cli import main
from cltrace.errors import UsageError
from cltrace.steering import Intervention
from cltrace.steering.metrics import metric_ids, parse_metric
from cltrace.steering.prompt_set import measure, run_set
from cltrace.steering.stats import bootstrap_interval, paired_summary, sign_flip_p
from support.tiny_gemma import CharTokenizer, tiny_replacement, use_tiny_model

PROMPTS = ["hello world", "the cat sat", "abc", "a longer prompt here", "zz top", "qwerty uiop"]


# --- statistics against direct computations ------------------------------------------------

def direct_sign_flip_p(d) -> float:
    """The two-sided sign-flip p-value by a loop over all 2^n sign vectors."""
    obs, hits, total = abs(sum(d) / len(d)), 0, 0
    for signs in itertools.product((1, -1), repeat=len(d)):
        stat = abs(sum(s * x for s, x in zip(signs, d)) / len(d))
        hits += stat >= obs - 1e-9 * max(abs(x) for x in d)
        total += 1
    return hits / total


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
def test_sign_flip_p_is_the_exact_enumeration(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.3, 1.0, n).tolist()
    p, exact = sign_flip_p(d)
    assert exact and p == pytest.approx(direct_sign_flip_p(d), abs=1e-12)
    # every change positive: only the all-plus and all-minus vectors reach |mean| (2 / 2^n)
    assert sign_flip_p([abs(x) + 0.1 for x in d])[0] == pytest.approx(2 / 2 ** n)
    assert sign_flip_p([0.0] * n)[0] == 1.0  # no change at all: nothing to reject


def test_sign_flip_p_monte_carlo_above_12():
    d = np.random.default_rng(0).normal(0.4, 1.0, 14)
    p, exact = sign_flip_p(d, n_resamples=40_000, seed=1)
    want = direct_sign_flip_p(d.tolist())  # 16384 sign vectors
    assert not exact and abs(p - want) < 0.01, (p, want)
    assert sign_flip_p(d, n_resamples=40_000, seed=1)[0] == p  # seeded


def test_bootstrap_interval_against_the_exact_bootstrap_distribution():
    """n = 4: all 4^4 = 256 resamples are equally likely; the Monte Carlo interval's ends are
    the 2.5% and 97.5% quantiles of that exact distribution (to the Monte Carlo error)."""
    d = np.array([0.5, -1.0, 2.0, 3.5])
    exact = np.array([np.mean(r) for r in itertools.product(d, repeat=4)])  # [256]
    lo, hi = bootstrap_interval(d, n_resamples=200_000, seed=3)
    for end, q in ((lo, 0.025), (hi, 0.975)):
        assert (exact < end - 1e-12).mean() <= q + 0.005 and (exact <= end + 1e-12).mean() >= q - 0.005
    assert bootstrap_interval(d, 1000, seed=3) == bootstrap_interval(d, 1000, seed=3)
    s = paired_summary([0, 0, 0, 0], d, n_resamples=1000, seed=3)
    assert s.mean_change == pytest.approx(d.mean()) and s.n == 4 and s.p_exact
    assert (s.ci_low, s.ci_high) == bootstrap_interval(d, 1000, seed=3)


def test_metric_parsing():
    m = parse_metric('logit-diff:" Paris"," London"')
    assert (m.kind, m.args) == ("logit-diff", (" Paris", " London"))
    assert parse_metric('logprob:"Sure, here"').args == ("Sure, here",)
    assert parse_metric("match:(?i)I can(no|')t").args == ("(?i)I can(no|')t",)
    for bad, words in [("logit-diff:\" a\"", "two quoted tokens"), ("perplexity:x", "expected"),
                       ("match:(", "bad regular expression"), ("logprob:abc", "one quoted string")]:
        with pytest.raises(UsageError, match=words):
            parse_metric(bad)
    with pytest.raises(UsageError, match="'ab' is 2 tokens, not one"):
        metric_ids(parse_metric('logit-diff:"ab","c"'), CharTokenizer())


# --- a planted effect on the tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def rm():
    model = tiny_replacement("plt", dtype=torch.float64)
    model.tokenizer = CharTokenizer()
    return model


def planted(rm, layer: int = 3, feature: int = 5):
    """Tokens (a, b) that adding to ``feature`` of the last layer must move apart: the
    decoder row through the final norm's weight, read by the unembedding, is largest at a and
    smallest at b. In the frozen model (features held) Δ(logit a − logit b) = A × that spread
    / rms > 0 on every prompt."""
    parts = rm.parts
    w = rm.transcoders.layers[layer].W_dec[feature].reshape(-1)  # [d_model]
    gain = 1 + parts.norm.weight.double()  # Gemma's RMSNorm scales by (1 + weight)
    score = parts.lm_head.weight.double() @ (gain * w.double())  # [vocab]
    score[:3] = 0  # not <pad>, <eos>, <bos>
    a, b = int(score[3:].argmax()) + 3, int(score[3:].argmin()) + 3
    return a, b


def char_of(token: int) -> str:
    return chr(token - 3)  # CharTokenizer: id = 3 + ord(c) % 290


@pytest.mark.parametrize("mode", ["frozen", "free"])
def test_planted_effect_moves_every_prompt(rm, tmp_path, mode):
    a, b = planted(rm)
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    metric = parse_metric(f"logit-diff:{json.dumps(char_of(a))},{json.dumps(char_of(b))}")
    ivs = [Intervention(3, 5, pos=-1, add=4.0)]
    res = run_set(rm, rm.tokenizer, read_prompts(path), metric, ivs, mode=mode,
                  freeze_features=mode == "frozen", n_resamples=2000, seed=0)
    changes = [r.after - r.before for r in res.rows]
    assert all(c > 0 for c in changes), changes
    assert res.summary.p_value == pytest.approx(2 / 2 ** len(PROMPTS)) and res.summary.p_exact
    assert 0 < res.summary.ci_low <= res.summary.mean_change <= res.summary.ci_high
    tokens = rm.tokenize(PROMPTS[0])  # the before value is the real model's logit difference
    with torch.no_grad():
        logits = rm.model(input_ids=tokens[None]).logits[0, -1]  # [vocab]
    assert res.rows[0].before == pytest.approx(float(logits[a] - logits[b]), rel=1e-6)
    # the opposite intervention moves every prompt the other way
    neg = run_set(rm, rm.tokenizer, read_prompts(path), metric,
                  [Intervention(3, 5, pos=-1, add=-4.0)], mode=mode,
                  freeze_features=mode == "frozen", n_resamples=200)
    assert all(r.after < r.before for r in neg.rows)


def test_free_logit_diff_equals_intervene(rm):
    """The set's free-mode forward (hooks) gives the logits of cltrace.steering.intervene."""
    from cltrace.steering import intervene

    tokens = rm.tokenize("hello world")
    ivs = [Intervention(1, 7, pos=slice(2, 6), scale=3.0), Intervention(3, 5, add=1.5)]
    a, b = 40, 77
    before, after, _ = measure(rm, tokens, parse_metric('logit-diff:"x","y"'), (a, b), ivs)
    res = intervene(rm, tokens, ivs, mode="free")  # (eager attention there: rounding differs)
    assert after == pytest.approx(float(res.logits[-1, a] - res.logits[-1, b]), rel=1e-6)
    assert before == pytest.approx(float(res.clean_logits[-1, a] - res.clean_logits[-1, b]), rel=1e-6)
    assert abs(after - before) > 1e-3  # the interventions do change it


def test_logprob_is_teacher_forced(rm):
    tokens = rm.tokenize("abc")
    cont = [3 + ord(c) for c in "de"]
    before, after, _ = measure(rm, tokens, parse_metric('logprob:"de"'), tuple(cont), [])
    seq = torch.cat([tokens, torch.tensor(cont)])
    with torch.no_grad():
        lp = rm.model(input_ids=seq[None]).logits[0].double().log_softmax(-1)  # [n_pos, vocab]
    want = float(lp[len(tokens) - 1, cont[0]] + lp[len(tokens), cont[1]])
    assert before == pytest.approx(want, rel=1e-9) and after == before


def test_steer_prompts_cli(monkeypatch, tmp_path, capsys):
    rm = tiny_replacement("plt", dtype=torch.float32)
    use_tiny_model(monkeypatch, rm)
    a, b = planted(rm)
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "label": "x"}) + "\n" for p in PROMPTS[:4])
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    metric = f"logit-diff:{json.dumps(char_of(a))},{json.dumps(char_of(b))}"
    out = tmp_path / "r.jsonl"
    assert main(["steer", "--prompts", str(path), "-f", "3:5@-1+4", "--metric", metric,
                 "--out", str(out), "--resamples", "500", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "paired sign-flip test of no change: p = 0.0625 (exact, all 2^5 sign flips" in text
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["slug"] for r in lines[:5]][-1] == "hi" and all(r["change"] > 0 for r in lines[:5])
    assert lines[5]["summary"]["n_resamples"] == 500 and lines[5]["metric"] == metric
    assert main(["steer", "--prompts", str(path), "-f", "3:5+4", "--metric", "match:ab",
                 "--max-new-tokens", "3", "--out", str(tmp_path / "m.json"), "--quiet"]) == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert len(data["prompts"]) == 5 and all(r["before"] in (0.0, 1.0) for r in data["prompts"])
    assert all("generated_after" in r for r in data["prompts"])
    capsys.readouterr()
    for argv, words in [(["--metric", 'logit-diff:"ab","c"'], "'ab' is 2 tokens, not one"),
                        (["--metric", "match:x", "--mode", "frozen"], "logit-diff only"),
                        ([], "needs both --prompts SET and --metric M")]:
        assert main(["steer", "--prompts", str(path), "-f", "3:5+4", "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


@pytest.mark.real_model
def test_real_steering_moves_a_logit_diff_on_every_prompt(real_gemma, monkeypatch, tmp_path, capsys):
    """Gemma 3 270M with the trained starter set: adding 2 to feature 17:703 at the last
    position (the layer-17 decoder row most against " Paris" − " London" through the final
    norm's gain) lowers logit(" Paris") − logit(" London") on each of the first 8 Paris
    prompts (support.prompt_sets; on all 12: −1.53 to −2.04, mean −1.75), so the exact
    sign-flip p is 2 / 2^8 and the bootstrap interval lies below 0. (8, not 12: a forward pass
    of the 270M took 2.4 s on the loaded 2-core machine.)"""
    import cltrace.models
    from support.prompt_sets import PARIS, write_jsonl

    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: real_gemma)
    path, out = tmp_path / "paris.jsonl", tmp_path / "r.json"
    write_jsonl(path, PARIS[:8])
    assert main(["steer", "--prompts", str(path), "-f", "17:703@-1+2", "--metric",
                 'logit-diff:" Paris"," London"', "--out", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    changes = [r["change"] for r in data["prompts"]]
    s = data["summary"]
    assert len(changes) == 8 and all(c < -0.5 for c in changes), changes
    assert s["p_value"] == pytest.approx(2 / 256) and s["p_exact"] and s["ci_high"] < 0
    assert "p = 0.007812 (exact, all 2^8 sign flips" in capsys.readouterr().out
