"""``cltrace eval`` and :func:`cltrace.evaluation.evaluate_set`: every metric against a plain
brute-force computation on the tiny model (hooks on the transformers layers, dense JumpReLU,
the cross-entropy by hand), the command end to end, and its bad inputs."""
from __future__ import annotations

import json
import math
import xml.dom.minidom

import pytest
import torch

from cltrace.cli import main
from cltrace.evaluation import EvalSettings, evaluate_set
from support.tiny_gemma import CharTokenizer, tiny_replacement, use_tiny_model
from support.transcoders import random_transcoders

BOS = 2


def _rows(n_rows: int = 5, ctx: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token rows starting with <bos>, one document starting inside row 1."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, 300, (n_rows, ctx), generator=g)
    rows[:, 0] = BOS
    rows[1, 7] = BOS
    return rows


def brute_force(model, ts, rows, layers, dense_threshold, max_tokens):
    """Every metric written out plainly: dense encodes, hooks that splice from the spliced
    run's own MLP inputs, log-softmax of the full logits."""
    parts_layers = model.model.layers
    n_layers = len(parts_layers)
    mask = torch.ones_like(rows, dtype=torch.bool)
    mask[:, 0] = False
    mask &= rows != BOS
    keep = mask.flatten().cumsum(0) <= max_tokens
    mask &= keep.view_as(mask)
    ce_mask = mask[:, :-1] & (rows[:, 1:] != BOS)

    def acts_of(S, x):  # dense JumpReLU of source layer S: [..., d_sae]
        tc = ts.layers[S]
        z = x @ tc.W_enc + tc.b_enc
        return z * (z > tc.threshold)

    def recon_of(L, xs):  # xs: {S: MLP input [..., d]}
        r = ts.layers[L].b_dec.clone()
        for S, tc in ts.layers.items():
            if 0 <= L - S < tc.n_out:
                r = r + acts_of(S, xs[S]) @ tc.W_dec[:, L - S]
        if ts.layers[L].W_skip is not None:
            r = r + xs[L] @ ts.layers[L].W_skip
        return r

    def nll(logits):
        lp = torch.log_softmax(logits.double(), -1)
        t = rows[:, 1:]
        per = -lp[:, :-1].gather(-1, t[..., None])[..., 0]
        return float(per[ce_mask].sum() / ce_mask.sum())

    xs, ys = {}, {}
    hs = [parts_layers[L].pre_feedforward_layernorm.register_forward_hook(
        lambda m, a, o, L=L: xs.__setitem__(L, o)) for L in range(n_layers)]
    hs += [parts_layers[L].post_feedforward_layernorm.register_forward_hook(
        lambda m, a, o, L=L: ys.__setitem__(L, o)) for L in range(n_layers)]
    with torch.no_grad():
        clean = nll(model(input_ids=rows).logits)
    for h in hs:
        h.remove()

    out = {"clean": clean, "tokens": int(mask.sum()), "ce_tokens": int(ce_mask.sum())}
    for L in layers:
        y = ys[L][mask]
        r = recon_of(L, xs)[mask]
        fvu = float((r - y).square().sum() / (y - y.mean(0)).square().sum())
        a = acts_of(L, xs[L])[mask]
        l0 = (a != 0).sum(-1).double()
        freq = (a != 0).double().mean(0)

        run_xs = {}

        def record(m, a_, o, S=None):
            run_xs[S] = o

        def splice(m, a_, o):
            o = o.clone()
            o[mask] = recon_of(L, run_xs)[mask]
            return o

        def zero(m, a_, o):
            o = o.clone()
            o[mask] = 0
            return o

        with torch.no_grad():
            hs = [parts_layers[S].pre_feedforward_layernorm.register_forward_hook(
                lambda m, a_, o, S=S: record(m, a_, o, S)) for S in range(L + 1)]
            hs.append(parts_layers[L].post_feedforward_layernorm.register_forward_hook(splice))
            ce_splice = nll(model(input_ids=rows).logits)
            for h in hs:
                h.remove()
            h = parts_layers[L].mlp.register_forward_hook(zero)  # post-norm of 0 is 0
            ce_zero = nll(model(input_ids=rows).logits)
            h.remove()
        q = torch.quantile(l0, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        out[L] = dict(fvu=fvu, l0=float(l0.mean()), l0_p10=float(q[0]), l0_p50=float(q[1]),
                      l0_p90=float(q[2]), l0_max=float(l0.max()),
                      dead=float((freq == 0).double().mean()),
                      dense=float((freq > dense_threshold).double().mean()),
                      ce_splice=ce_splice, ce_zero=ce_zero, delta_ce=ce_splice - clean,
                      loss_recovered=(ce_zero - ce_splice) / (ce_zero - clean))
    return out


@pytest.mark.parametrize("kind", ["plt", "plt+skip", "clt", "clt+skip"])
def test_every_metric_against_brute_force(kind):
    rm = tiny_replacement(kind)  # float64 model and set
    rows = _rows()
    settings = EvalSettings(tokens=60, ctx=16, batch=2, dense_threshold=0.2)
    report = evaluate_set(rm.model, rm.transcoders, rows, settings, bos_token_id=BOS)
    want = brute_force(rm.model, rm.transcoders, rows, [0, 1, 2, 3], 0.2, 60)
    assert report.tokens == want["tokens"] == 60 and report.ce_tokens == want["ce_tokens"]
    assert report.rows == 5  # 60 tokens need the first 5 rows (14 or 15 each)
    assert report.clean_ce == pytest.approx(want["clean"], rel=1e-9)
    assert [e.layer for e in report.layers] == [0, 1, 2, 3]
    for e in report.layers:
        for k, v in want[e.layer].items():
            assert getattr(e, k) == pytest.approx(v, rel=1e-7, abs=1e-9), (kind, e.layer, k)
    # the tables and the means
    mean = report.mean()
    assert mean["fvu"] == pytest.approx(sum(want[L]["fvu"] for L in range(4)) / 4)
    text = report.table()
    assert text.splitlines()[0].split()[:3] == ["layer", "FVU", "L0"]
    assert len(text.splitlines()) == 2 + 4 + 2 and text.splitlines()[-1].split()[0] == "mean"


def test_layers_tokens_and_a_loaded_model():
    """--layers restricts (a CLT still sums every source layer below), the token budget
    counts <bos>-free positions, a LoadedModel gives the <bos> id and the model's name."""
    import cltrace.models

    rm = tiny_replacement("clt")
    rows = _rows(n_rows=6)
    loaded = cltrace.models.LoadedModel(rm.model, CharTokenizer(), "tiny")
    report = evaluate_set(loaded, rm.transcoders, rows, EvalSettings(tokens=20, ctx=16, batch=4,
                                                                      layers=(1, 3)))
    want = brute_force(rm.model, rm.transcoders, rows[:2], [1, 3], 0.1, 20)
    assert report.model_name == "tiny" and report.tokens == 20 and report.rows == 2
    assert [e.layer for e in report.layers] == [1, 3]
    for e in report.layers:
        for k, v in want[e.layer].items():
            assert getattr(e, k) == pytest.approx(v, rel=1e-7, abs=1e-9), (e.layer, k)
    from cltrace.errors import UsageError

    with pytest.raises(UsageError, match="no transcoder at layer"):
        evaluate_set(loaded, rm.transcoders, rows, EvalSettings(layers=(5,)))
    with pytest.raises(UsageError, match="--dense-threshold"):
        evaluate_set(loaded, rm.transcoders, rows, EvalSettings(dense_threshold=2.0))


def test_fvu_is_the_training_loops():
    """One FVU: training.loop.evaluate reports what FVUSums computes."""
    from cltrace.evaluation import FVUSums
    from cltrace.models.activations import Activations
    from cltrace.training.loop import evaluate

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 16, generator=g)
    ts = random_transcoders("clt", mlp_in=x, skip=True)
    y = torch.randn(3, 40, 16, generator=g)

    class Source:
        def read(self, idx):
            return Activations(x[:, idx], y[:, idx])

    fvu, _, n = evaluate(ts, Source(), torch.arange(40), chunk_rows=16)
    assert n == 40
    for L in range(3):
        r = ts.layers[L].b_dec + x[L] @ ts.layers[L].W_skip
        for S in range(L + 1):
            tc = ts.layers[S]
            z = x[S] @ tc.W_enc + tc.b_enc
            r = r + (z * (z > tc.threshold)) @ tc.W_dec[:, L - S]
        s = FVUSums()
        s.add(r, y[L])
        yd = y[L].double()
        plain = float((r.double() - yd).square().sum() / (yd - yd.mean(0)).square().sum())
        assert fvu[L] == pytest.approx(s.value, rel=1e-5) and s.value == pytest.approx(plain, rel=1e-9)


# --- the command ---------------------------------------------------------------------------

TEXT = ("The river runs past the old mill and under the stone bridge. Children play on its "
        "banks in summer.\n\n\nIn winter the water freezes and the town skates on it.\n\n\n"
        "A third document, about nothing in particular, long enough to fill a few rows. ") * 3


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    rm = tiny_replacement("clt+skip", dtype=torch.float32)
    use_tiny_model(monkeypatch, rm)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    return rm, corpus


def test_cli_end_to_end(tiny_cli, tmp_path, capsys):
    rm, corpus = tiny_cli
    js, svg = tmp_path / "e.json", tmp_path / "e.svg"
    rc = main(["eval", "--corpus", str(corpus), "--tokens", "150", "--ctx", "32", "--batch", "3",
               "--dense-threshold", "0.3", "--json", str(js), "--plot", str(svg), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""  # --quiet
    lines = captured.out.splitlines()
    assert lines[0].startswith("set ") and "150 tokens" in lines[0] and "clean CE" in lines[0]
    assert lines[1].split()[:2] == ["layer", "FVU"]
    assert [ln.split()[0] for ln in lines[3:7]] == ["0", "1", "2", "3"] and lines[8].startswith(" mean")
    assert f"wrote {js}" in captured.out and f"wrote {svg}" in captured.out

    data = json.loads(js.read_text())
    assert data["model"] == "tiny" and data["tokens"] == 150 and data["set_kind"] == "clt"
    assert data["affine_skip"] is True and data["corpus"] == str(corpus)
    assert data["settings"] == {"tokens": 150, "ctx": 32, "batch": 3, "dense_threshold": 0.3,
                                "layers": None}
    assert [d["layer"] for d in data["layers"]] == [0, 1, 2, 3]
    # the same numbers as the API on the same rows
    from cltrace.training.corpus import token_rows

    rows = token_rows(CharTokenizer(), [d.strip() for d in TEXT.split("\n\n\n") if d.strip()], 32,
                      max_tokens=150)
    report = evaluate_set(rm.model, rm.transcoders, rows,
                          EvalSettings(tokens=150, ctx=32, batch=3, dense_threshold=0.3),
                          bos_token_id=BOS)
    for d, e in zip(data["layers"], report.layers):
        for k in ("fvu", "l0", "l0_p10", "l0_p50", "l0_p90", "l0_max", "dead", "dense",
                  "ce_splice", "ce_zero", "delta_ce", "loss_recovered"):
            assert d[k] == pytest.approx(getattr(e, k), rel=1e-5, abs=1e-7), k
    assert data["clean_ce"] == pytest.approx(report.clean_ce, rel=1e-6)
    assert set(data["mean"]) >= {"fvu", "l0", "loss_recovered", "delta_ce"}

    doc = xml.dom.minidom.parseString(svg.read_text())  # well-formed
    assert doc.documentElement.tagName == "svg"
    assert "loss recovered" in svg.read_text() and "L0 mean" in svg.read_text()

    # progress bars and messages without --quiet; --layers restricts the rows
    assert main(["eval", "--corpus", str(corpus), "--tokens", "40", "--ctx", "16",
                 "--layers", "2"]) == 0
    captured = capsys.readouterr()
    assert "evaluating 1 layer(s)" in captured.err and "evaluating:" in captured.err
    assert [ln.split()[0] for ln in captured.out.splitlines()[3:4]] == ["2"]


def test_cli_with_a_set_folder(tiny_cli, tmp_path, capsys):
    """SET given: the Gemma Scope 2 layout (and circuit-tracer's) on disk; a set for another
    model is refused before any work."""
    from support.layouts import write_circuit_tracer_clt
    from cltrace.transcoders.write import save_gemmascope

    rm, corpus = tiny_cli
    folder = save_gemmascope(rm.transcoders, tmp_path / "set")
    assert main(["eval", str(folder), "--corpus", str(corpus), "--tokens", "30", "--ctx", "16",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "set set (clt, 48 features, affine skip)" in out
    ct = write_circuit_tracer_clt(tmp_path / "ct", rm.transcoders)
    assert main(["eval", str(ct), "--corpus", str(corpus), "--tokens", "30", "--ctx", "16",
                 "--quiet", "--json", str(tmp_path / "ct.json")]) == 0
    assert json.loads((tmp_path / "ct.json").read_text())["set_kind"] == "clt"
    capsys.readouterr()


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_cli_bad_inputs(tiny_cli, tmp_path, capsys):
    from cltrace.transcoders.write import save_gemmascope

    rm, corpus = tiny_cli
    out = tmp_path / "out"
    out.mkdir()
    js, svg = out / "e.json", out / "e.svg"
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n ")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\0def")
    other = save_gemmascope(random_transcoders("plt", n_layers=3, d_model=16), tmp_path / "other")
    cases = [
        (["--corpus", str(tmp_path / "missing.txt")], ["missing.txt"]),
        (["--corpus", str(empty)], ["empty.txt", "empty"]),
        (["--corpus", str(binary)], ["bin.txt", "binary"]),
        (["--corpus", str(tmp_path)], ["a folder"]),
        ([str(other), "--corpus", str(corpus)], ["d_model 16"]),
        ([str(tmp_path / "no-set"), "--corpus", str(corpus)], ["no-set"]),
        (["--corpus", str(corpus), "--layers", "7"], ["--layers", "layer(s) 7", "0-3"]),
        (["--corpus", str(corpus), "--tokens", "0"], ["--tokens", ">= 1"]),
        (["--corpus", str(corpus), "--ctx", "1"], ["--ctx"]),
        (["--corpus", str(corpus), "--batch", "-2"], ["--batch"]),
        (["--corpus", str(corpus), "--dense-threshold", "1.5"], ["--dense-threshold"]),
        (["--corpus", str(corpus), "--dense-threshold", "nan"], ["--dense-threshold"]),
        (["--corpus", str(corpus), "--tokens", "many"], ["--tokens", "many"]),
        (["--corpus", str(corpus), "--layers", "a-b"], ["--layers", "a-b"]),
        (["--corpus", str(corpus), "--plot", str(out / "e.png")], ["--plot", ".svg"]),
        (["--corpus", str(corpus), "--plot", str(tmp_path / "nowhere" / "e.svg")], ["does not exist"]),
        (["--corpus", str(corpus), "--json", str(svg), "--plot", str(svg)], ["same file"]),
    ]
    for args, needles in cases:
        try:
            rc = main(["eval", *args, "--json", str(js), "--plot", str(svg), "--quiet"]
                      if "--json" not in args and "--plot" not in args else ["eval", *args, "--quiet"])
        except SystemExit as e:  # argparse: a bad option value
            rc = e.code
        assert rc == 2, args
        _one_line(capsys, *needles)
        assert list(out.iterdir()) == [], args  # nothing written
    # a corpus too short for one row
    (tmp_path / "short.txt").write_text("hi")
    assert main(["eval", "--corpus", str(tmp_path / "short.txt"), "--json", str(js), "--quiet"]) == 2
    _one_line(capsys, "too short")
    assert list(out.iterdir()) == []


def test_lazy_export():
    import cltrace

    assert cltrace.evaluate_set is evaluate_set and cltrace.EvalSettings is EvalSettings


@pytest.mark.real_model
def test_real_model(real_gemma):
    """The 270M with the synthetic starter set on text of its calibration kind (on other text
    its ridge-fitted decoders can leave more than the variance: FVU > 1 at some layers)."""
    from cltrace.training.corpus import token_rows
    from cltrace.training.starter import calibration_texts
    from support.transcoders import synthetic_starter_transcoders

    ts = synthetic_starter_transcoders(real_gemma)
    rows = token_rows(real_gemma.tokenizer, calibration_texts(), 64, max_tokens=256)
    report = evaluate_set(real_gemma, ts, rows, EvalSettings(tokens=256, ctx=64, batch=5,
                                                             layers=(0, 7, 17)))
    assert report.tokens == 256 and [e.layer for e in report.layers] == [0, 7, 17]
    assert math.isfinite(report.clean_ce) and 0 < report.clean_ce < 10
    for e in report.layers:
        values = [getattr(e, k) for k in ("fvu", "l0", "l0_p10", "l0_p50", "l0_p90", "l0_max",
                                          "dead", "dense", "ce_splice", "ce_zero", "delta_ce",
                                          "loss_recovered")]
        assert all(math.isfinite(v) for v in values), e
        assert 0 <= e.fvu <= 2 and 0 <= e.dead <= 1 and e.l0 > 0
    assert math.isfinite(report.mean()["loss_recovered"])
    print(report.summary())
    print(report.table())
