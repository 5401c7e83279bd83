"""A tiny model with a planted feature for the contrast tests: layer 0 feature PLANT fires
(activation ~10, nearly constant) on the last position of a prompt ending in 'q' and nowhere
else on the prompts of SET_A / SET_B, and writes the target 'x' logit up strongly, so the
pruned graphs of set A keep it and those of set B never see it."""
from __future__ import annotations

import json

import pytest
import torch

from .batch import CrashingTokenizer
from .tiny_gemma import mlp_inputs, tiny_replacement

PLANT = 7  # layer 0
WORDS = ["the cat sat", "a dog ran", "hello world", "abc def", "on the mat", "big red box",
         "one two", "sun and rain", "fish swim", "cold tea"]
SET_A = [w + " q" for w in WORDS]  # ends in 'q': the planted feature fires there
SET_B = [w + " z" for w in WORDS]
TARGET = "x"


def planted_replacement():
    """(ReplacementModel, tokenizer) of the tiny CLT with feature PLANT of layer 0 planted."""
    rm = tiny_replacement("clt", dtype=torch.float32)
    tok = CrashingTokenizer()  # a CharTokenizer with encode()
    on, off = [], []
    for text in SET_A + SET_B:
        ids = tok(text)["input_ids"]
        x = mlp_inputs(rm.model, ids)[0]  # [n_pos, d_model] at layer 0
        for pos in range(len(ids)):
            (on if text.endswith("q") and pos == len(ids) - 1 else off).append(x[pos])
    on, off = torch.stack(on), torch.stack(off)
    w = on.mean(0) - off.mean(0)
    w = w / w.norm()
    lo, hi = (off @ w).max(), (on @ w).min()
    assert hi > lo, "the 'q' positions are not separable along the planted direction"
    scale = 0.1 / (hi - lo)  # pre-activation = 10 + a small spread; the jump at 10 + mid gap
    tc = rm.transcoders.layers[0]
    with torch.no_grad():
        tc.W_enc[:, PLANT] = w * scale
        tc.b_enc[PLANT] = 10.0 - scale * (lo + hi) / 2
        tc.threshold[PLANT] = 10.0
        unembed = rm.model.lm_head.weight[tok(TARGET, add_special_tokens=False)["input_ids"][0]]
        tc.W_dec[PLANT] = 0.0
        tc.W_dec[PLANT, -1] = 0.5 * unembed / unembed.norm()  # into the last layer's MLP output
    return rm, tok


def save_planted(path) -> str:
    rm, _ = planted_replacement()
    torch.save({"model": rm.model, "transcoders": rm.transcoders}, path)
    return str(path)


N = 8  # prompts per set in the contrast tests
TRACE = ["--workers", "0", "--max-feature-nodes", "32", "--batch-size", "16", "--quiet"]  # cheap tracing


def write_sets(folder, n: int = N, pairs: bool = False, **extra):
    """(a.jsonl, b.jsonl) in ``folder``: the first ``n`` prompts of SET_A / SET_B with the
    target TARGET; ``pairs``: each prompt's 'pair' is the index of its WORDS entry, so "w q" in
    A and "w z" in B (the same length) form a minimal pair. ``extra``: more columns of every row."""
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    for path, prompts in ((a, SET_A[:n]), (b, SET_B[:n])):
        path.write_text("".join(json.dumps({"prompt": p, "target": TARGET, **({"pair": i} if pairs else {}),
                                            **extra}) + "\n" for i, p in enumerate(prompts)))
    return a, b


def use_planted(mp, rm, tok) -> None:
    """The commands load the planted model (and its tokenizer, for the pair checks) whatever
    model they are asked for (``mp``: a pytest MonkeyPatch)."""
    import cltrace.models
    import cltrace.training.starter

    mp.setattr(cltrace.models, "load_model", lambda *a, **k: cltrace.models.LoadedModel(rm.model, tok, "tiny"))
    mp.setattr(cltrace.training.starter, "starter_transcoders", lambda *a, **k: rm.transcoders)
    mp.setattr(cltrace.models, "load_tokenizer", lambda *a, **k: tok)


def traced_folder(folder, rm, tok, pairs: bool = False):
    """``folder``/out: ``cltrace contrast`` of the planted model's two sets of N prompts (traced
    in this process; ``pairs``: prompt i of A paired with prompt i of B)."""
    from cltrace.cli import main

    a, b = write_sets(folder, N, pairs=pairs)
    with pytest.MonkeyPatch.context() as mp:
        use_planted(mp, rm, tok)
        assert main(["contrast", str(a), str(b), "--out", str(folder / "out"), *TRACE]) == 0
    return folder / "out"


@pytest.fixture(scope="module")
def planted_model():
    """(ReplacementModel, tokenizer) of the planted model (import the fixture into a test module)."""
    return planted_replacement()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, planted_model):
    """The contrast folder of the planted model's two sets (traced in this process)."""
    return traced_folder(tmp_path_factory.mktemp("contrast"), *planted_model)
