"""End-to-end fine-tuning (``cltrace train --finetune``, :mod:`cltrace.training.finetune`): the
KL term against two plain forward passes, its gradient against finite differences, a poor
dictionary's loss recovered raised, the files and the refusals."""
from __future__ import annotations

import torch
import pytest

from cltrace.cli import main
from cltrace.errors import UsageError
from cltrace.evaluation import EvalSettings, evaluate_set
from cltrace.training import TrainConfig
from cltrace.training.finetune import FineTuner, finetune_set
from support.dictionaries import random_saes, site_acts, site_hook
from support.tiny_gemma import CharTokenizer, exact_norms, tiny_gemma
from support.transcoders import random_transcoders

BOS = 2
MARGIN = {"transcoders": 0.3, "sae": 0.3}  # measured gains 0.71-0.78 and 0.67-1.02 (seeds fixed)


def _rows(n: int = 3, ctx: int = 12, seed: int = 0):
    rows = torch.randint(3, 300, (n, ctx), generator=torch.Generator().manual_seed(seed))
    rows[:, 0] = BOS
    rows[1, 5] = BOS  # a document boundary inside a row: not spliced, not scored
    return rows


def _set(model, rows, what: str):
    if what == "sae":
        return random_saes(model, rows, "resid_post", layers=[1, 2])
    x = torch.stack([a.flatten(0, 1) for a in site_acts(model, rows, "mlp_in", range(4)).values()])
    return random_transcoders("plt", mlp_in=x, skip=True, d_sae=48, layers=[1, 2])


def _direct_kl(model, ts, rows, L: int, bos: int = BOS) -> float:
    """KL(p_clean || p_spliced) per scored position, fp64: two plain passes, the second with a
    forward hook putting the dictionary's reconstruction (from that pass's own input site) at
    the output site of L."""
    tc = ts.layers[L]
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[:, 0] = False
    mask &= rows != bos
    with torch.no_grad():
        clean = model(input_ids=rows).logits.double().log_softmax(-1)[mask]
        got = {}
        h_in = site_hook(model, ts.site_in, L, lambda a: got.__setitem__("x", a))

        def splice(a):
            x = got["x"]
            z = x @ tc.W_enc + tc.b_enc
            r = (z * (z > tc.threshold)) @ tc.W_dec[:, 0] + tc.b_dec
            if tc.W_skip is not None:
                r = r + x @ tc.W_skip
            a = a.clone()
            a[mask] = r[mask]
            return a
        h_out = site_hook(model, ts.site_out, L, splice) if ts.site_in != ts.site_out else None
        if h_out is None:  # an SAE: its input is the site it replaces
            h_in.remove()
            h_in = site_hook(model, ts.site_in, L, lambda a: (got.__setitem__("x", a), splice(a))[1])
        try:
            spliced = model(input_ids=rows).logits.double().log_softmax(-1)[mask]
        finally:
            h_in.remove()
            if h_out is not None:
                h_out.remove()
    return float((clean.exp() * (clean - spliced)).sum(-1).mean())


@pytest.mark.parametrize("what", ["transcoders", "sae"])
def test_kl_term_matches_two_plain_passes(what):
    model = tiny_gemma(dtype=torch.float64)
    rows = _rows()
    ts = _set(model, rows, what)
    ft = FineTuner(model, ts, TrainConfig(backend="dense"), kl_coeff=0.5, bos_token_id=BOS)
    obj = ft.objective(rows)
    assert sorted(obj.kl) == [1, 2]
    for L in (1, 2):
        want = _direct_kl(model, ts, rows, L)
        assert want > 1e-3  # a random dictionary moves the distribution
        assert obj.kl[L] == pytest.approx(want, rel=1e-9)
    assert obj.loss == pytest.approx(obj.train_loss + 0.5 * (obj.kl[1] + obj.kl[2]), rel=1e-12)


@pytest.mark.parametrize("what", ["transcoders", "sae"])
def test_gradient_matches_finite_differences(what):
    """d loss / d weight of the two-stage backward against central differences (fp64) for
    decoder, encoder and bias entries (the encoder away from any threshold: its jumps have no
    derivative, the straight-through estimator only reaches the thresholds). RMSNorms in fp64
    too (transformers computes them in fp32, which a step of 1e-6 cannot resolve)."""
    model = tiny_gemma(dtype=torch.float64)
    exact_norms(model)
    rows = _rows(n=2, ctx=10)
    ts = _set(model, rows, what)
    ft = FineTuner(model, ts, TrainConfig(backend="dense"), kl_coeff=2.0, bos_token_id=BOS)
    ft.objective(rows)  # initializes
    for p in ft.params.parameters():
        p.grad = None
    ft.objective(rows, backward=True)
    p = ft.params
    entries = [(p.W_dec[0], (3, 0, 5)), (p.W_dec[1], (7, 0, 1)), (p.b_dec[0], (2,)),
               (p.W_enc[1], (4, 9)), (p.b_enc[0], (11,))]
    if what == "transcoders":
        entries.append((p.W_skip[1], (0, 3)))
    h = 1e-6
    for w, idx in entries:
        with torch.no_grad():
            w[idx] += h
            up = ft.objective(rows)
            w[idx] -= 2 * h
            down = ft.objective(rows)
            w[idx] += h
        assert up.stats.l0 == down.stats.l0  # no feature crossed its threshold
        fd = (up.loss - down.loss) / (2 * h)
        assert float(w.grad[idx]) == pytest.approx(fd, rel=1e-5, abs=1e-8), (w.shape, idx)
        assert abs(fd) > 1e-6


@torch.no_grad()
def _sampled_rows(model, n: int, ctx: int, seed: int):
    """``[n, ctx]`` rows sampled from the model itself (<bos> first): on such text the clean
    model's expected CE is the lowest any distribution gets, and a splice's expected extra CE
    is its KL to the clean model, so the loss recovered measures what fine-tuning targets (on
    arbitrary text a random model's CE is noise: zero-ablating can lower it)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((n, 1), BOS)
    for _ in range(ctx - 1):
        p = model(input_ids=rows).logits[:, -1].double().softmax(-1)
        p[:, BOS] = 0  # no document boundary inside a row
        rows = torch.cat([rows, torch.multinomial(p, 1, generator=g)], 1)
    return rows


@pytest.mark.parametrize("what", ["transcoders", "sae"])
def test_finetuning_raises_loss_recovered(what, tmp_path):
    """A random dictionary on the tiny model: fine-tuning on model-sampled rows raises the loss
    recovered that evaluate_set measures on other sampled rows (and lowers the held-out KL,
    the FVU moving the same way); the set is written and read back in the same layout."""
    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.write import save_gemmascope

    model = tiny_gemma()
    train, held = _sampled_rows(model, 96, 33, seed=1), _sampled_rows(model, 48, 33, seed=2)
    ts = _set(model, _rows(n=6, ctx=33), what)
    settings = EvalSettings(tokens=48 * 32, ctx=33, batch=16)
    before = evaluate_set(model, ts, held, settings, bos_token_id=BOS)
    cfg = TrainConfig(backend="dense", lr=1e-3, warmup_steps=3, seed=0)
    ft = FineTuner(model, ts, cfg, kl_coeff=1.0, bos_token_id=BOS, total_steps=48)
    objs = [ft.step(train[(2 * s) % 96:(2 * s) % 96 + 2]) for s in range(48)]
    save_gemmascope(ft.result(), tmp_path / "ft", l0=8)
    back = load_transcoders(tmp_path / "ft", layers=[1, 2], model_config=model)
    after = evaluate_set(model, back, held, settings, bos_token_id=BOS)
    for L in (1, 2):
        b, a = before.layer(L), after.layer(L)
        assert a.loss_recovered > b.loss_recovered + MARGIN[what], (L, b.loss_recovered, a.loss_recovered)
        assert a.l0 < 1.5 * b.l0 + 1  # not bought with more active features
    kl = [FineTuner(model, t, cfg, bos_token_id=BOS).objective(held).kl for t in (ts, back)]
    assert all(kl[1][L] < 0.7 * kl[0][L] for L in (1, 2)), kl
    assert sum(objs[-1].kl.values()) < sum(objs[0].kl.values())
    assert (back.what, sorted(back.layers), back.d_sae) == (ts.what, [1, 2], ts.d_sae)
    assert (back.layers[1].W_skip is not None) == (what == "transcoders")
    print(what, [(round(before.layer(L).loss_recovered, 3), round(after.layer(L).loss_recovered, 3))
                 for L in (1, 2)], kl)


def test_cli_finetune_and_its_refusals(monkeypatch, tmp_path, capsys):
    import cltrace.models
    from cltrace.transcoders.write import save_gemmascope
    from cltrace.transcoders import load_transcoders

    model = tiny_gemma()
    loaded = cltrace.models.LoadedModel(model, CharTokenizer(), "tiny")
    monkeypatch.setattr(cltrace.models, "load_model", lambda *a, **k: loaded)
    ts = random_saes(model, _rows(n=4, ctx=33), "mlp_out", layers=[0, 3])
    save_gemmascope(ts, tmp_path / "sae", l0=7)
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    base = ["train", "--finetune", str(tmp_path / "sae"), "--corpus", str(corpus), "--out", str(out),
            "--quiet"]
    for extra, says in [(["--kl-coeff", "-1"], "--kl-coeff must be a finite number >= 0, got '-1'"),
                        (["--kl-coeff", "nan"], "--kl-coeff must be a finite number >= 0, got 'nan'"),
                        (["--kl-coeff", "abc"], "--kl-coeff must be a number >= 0, got 'abc'"),
                        (["--layers", "1"], "no dictionary at layer(s) 1 (it has 0,3)"),
                        (["--width", "64"], "--finetune takes its shape from the set: drop --width")]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (extra, err)
    other = random_transcoders("plt", d_model=32, n_layers=4, d_sae=16)
    save_gemmascope(other, tmp_path / "other")
    assert main(["train", "--finetune", str(tmp_path / "other"), "--corpus", str(corpus), "--out",
                 str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "d_model" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    assert main(base + ["--layers", "3", "--tokens", "256", "--batch-size", "64", "--ctx", "33"]) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned SAEs at mlp_out layer(s) [3] on 256 tokens" in printed and "KL" in printed
    back = load_transcoders(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "sae").iterdir())
    assert back.what == "SAEs at mlp_out"
    torch.testing.assert_close(back.layers[0].W_enc, ts.layers[0].W_enc)  # not spliced: as it was
    assert not torch.equal(back.layers[3].W_dec, ts.layers[3].W_dec)


def test_crosscoder_is_refused():
    model = tiny_gemma()
    ts = random_saes(model, _rows(), "resid_post", sites=[0, 2])
    with pytest.raises(UsageError, match="fine-tuning a crosscoder at resid_post is not supported"):
        FineTuner(model, ts, TrainConfig())


@pytest.mark.real_model
def test_real_model_kl_term_and_one_step(real_gemma):
    """On the 270M (fp32, CPU): a random resid_post SAE at layer 6, calibrated on the model's
    own activations: the KL term equals two plain passes with a splicing hook, and one step
    moves the decoder."""
    model = real_gemma.model
    rows = real_gemma.tokenizer("The capital of France is Paris, and the capital of Italy is "
                                "Rome.", return_tensors="pt")["input_ids"][:, :16]
    acts = site_acts(model, rows, "resid_post", [6])[6].flatten(0, 1)  # [T, 640]
    ts = random_transcoders(mlp_in=acts[None].expand(18, -1, -1).contiguous(), d_sae=256,
                            site="resid_post", layers=[6], model_name="gemma-3-270m")
    ft = FineTuner(model, ts, TrainConfig(lr=5e-6), layers=[6],
                   bos_token_id=real_gemma.tokenizer.bos_token_id)
    want = _direct_kl(model, ts, rows, 6, bos=real_gemma.tokenizer.bos_token_id)
    obj = ft.step(rows)
    assert obj.kl[6] == pytest.approx(want, rel=1e-4) and want > 1e-3
    assert not torch.equal(ft.result().layers[6].W_dec, ts.layers[6].W_dec)
