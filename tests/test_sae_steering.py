"""Steering with SAE latents (cltrace.steering.sae, ``cltrace steer --sae``): the same tokens
and logits as a plain forward hook adding the same vector at the SAE's site, on a tiny random
Gemma 3 with random SAEs in the Gemma Scope 2 layout; the command's errors; and on the real
Gemma 3 270M, an SAE trained by ``cltrace train --site resid_post`` steering a continuation."""
from __future__ import annotations

import re

import pytest
import torch

from cltrace.steering import Intervention, SaeSteering, generate
from cltrace.transcoders import load_transcoders
from cltrace.transcoders.write import save_gemmascope
from support.numerics import torch_threads
from support.sae_steering import calibrated_saes, greedy, reference_hook
from support.tiny_gemma import CAPITAL_WORDS, TOKENS, save_word_tokenizer, tiny_gemma
from support.transcoders import random_transcoders

SITES = ("resid_post", "attn_out", "mlp_out")


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def model():
    return tiny_gemma(n_layers=3, dtype=torch.float64)


@pytest.fixture(scope="module", params=SITES)
def steering(request, model, tmp_path_factory):
    """SaeSteering on the tiny model with SAEs at one site written and read back."""
    site = request.param
    root = tmp_path_factory.mktemp(site) / f"{site}_all"
    save_gemmascope(calibrated_saes(model, torch.tensor(TOKENS), site), root, l0="small")
    saes = load_transcoders(root / "width_32_l0_small", model_config=model)
    assert saes.site_in == site and not saes.is_transcoder
    return SaeSteering(model, saes)


def _latents(sae, x):
    """JumpReLU activations [n_pos, d_sae] of an SAE on x [n_pos, width]."""
    z = x @ sae.W_enc + sae.b_enc
    return z * (z > sae.threshold)


def _site(model, site, L, tokens):
    """The activation [n_pos, width] at the site of layer L on tokens."""
    got = {}

    def keep(a):
        got["x"] = a[0].clone()
        return a

    with torch.no_grad(), reference_hook(model, site, L, keep):
        model(input_ids=tokens[None])
    return got["x"]


@pytest.mark.parametrize("steer_generated", [False, True])
def test_adding_a_latent_equals_a_hook_adding_its_decoder_row(steering, model, steer_generated):
    """+4 on latent f of layer 1: the steered tokens and every step's logits are those of a
    plain hook adding 4 W_dec[f] at the site, on every position but <bos> (of the prompt, or
    of the growing text with steer_generated)."""
    st, tokens = steering, torch.tensor(TOKENS)
    v = 4.0 * st.transcoders.layers[1].W_dec[5, 0]  # [width]
    n = tokens.numel()

    def add(x):
        y = x.clone()
        y[0, 1:(None if steer_generated else n)] += v
        return y

    with reference_hook(model, st.site, 1, add):
        want, want_logits = greedy(model, tokens, 6)
        want_prompt = model(input_ids=tokens[None]).logits[0]
    got = generate(st, tokens, [Intervention(1, 5, add=4.0)], max_new_tokens=6,
                   steer_generated=steer_generated, stop_at_eos=False)
    assert torch.equal(got.tokens, want)
    torch.testing.assert_close(st.logits(tokens, [Intervention(1, 5, add=4.0)]), want_prompt,
                               rtol=0, atol=1e-10)
    with st.steering_hooks([Intervention(1, 5, add=4.0)], 1,
                           n_ref=None if steer_generated else n):
        _, got_logits = greedy(model, tokens, 6)
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-10)
    assert (got_logits - greedy(model, tokens, 6)[1]).abs().max() > 1e-3  # the vector mattered


def test_clamping_a_latent_adds_the_difference_at_the_positions_named(steering, model):
    """=3 on latent f at positions 2:5 adds (3 - a_f) W_dec[f] there, a_f encoded from the
    site in the same pass; *0 on an active latent removes a_f W_dec[f] at one position."""
    st, tokens = steering, torch.tensor(TOKENS)
    sae = st.transcoders.layers[2]

    def clamp(x):
        a = _latents(sae, x[0])[:, 7]  # [n_pos]
        y = x.clone()
        y[0, 2:5] += (3.0 - a[2:5])[:, None] * sae.W_dec[7, 0]
        return y

    with reference_hook(model, st.site, 2, clamp):
        want = model(input_ids=tokens[None]).logits[0]
    got = st.logits(tokens, [Intervention(2, 7, pos=slice(2, 5), set=3.0)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)

    acts = _latents(st.transcoders.layers[0], _site(model, st.site, 0, tokens))  # [n_pos, 32]
    pos, f = map(int, (acts[1:] > 0).nonzero()[0])
    pos += 1  # (after <bos>)
    a = float(acts[pos, f])

    def ablate(x):
        y = x.clone()
        y[0, pos] -= a * st.transcoders.layers[0].W_dec[f, 0]
        return y

    with reference_hook(model, st.site, 0, ablate):
        want = model(input_ids=tokens[None]).logits[0]
    torch.testing.assert_close(st.logits(tokens, [Intervention(0, f, pos=pos, scale=0.0)]), want,
                               rtol=0, atol=1e-10)


# --- the command ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    """A saved tiny model with a word tokenizer, SAEs at resid_post of layers 0 and 2 for it,
    SAEs for another model (width 32), transcoders and a crosscoder."""
    root = tmp_path_factory.mktemp("cli")
    m = tiny_gemma(n_layers=3)
    m.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", CAPITAL_WORDS)
    ids = torch.tensor([2, 4, 5, 6, 7, 8])
    saes = calibrated_saes(m, ids, "resid_post")
    saes.layers = {L: saes.layers[L] for L in (0, 2)}
    save_gemmascope(saes, root / "sae")
    save_gemmascope(random_transcoders(n_layers=3, d_model=32, d_sae=16, site="resid_post"),
                    root / "other")
    save_gemmascope(random_transcoders(n_layers=3, d_model=64, d_sae=16), root / "tc")
    save_gemmascope(random_transcoders(n_layers=3, d_model=64, d_sae=16, sites=[0, 2]),
                    root / "crosscoder" / "layer_0_2_width_16_l0_small")
    return root


def _steer(root, *extra):
    from cltrace.cli import main

    return main(["steer", "the capital of france", "--model", str(root / "model"), *extra])


def test_cli_steers_with_a_latent(cli_root, capsys):
    assert _steer(cli_root, "--sae", str(cli_root / "sae"), "--feature", "2:3+40",
                  "--max-new-tokens", "5", "--top-k", "3", "--quiet") == 0
    out = capsys.readouterr().out
    assert "interventions (free mode, SAE latents at resid_post): 2:3+40" in out
    assert "generated before:" in out and "generated after:" in out
    # (the tiny model's ids outside the word vocabulary decode to '': compare the top token)
    m = re.search(r"top token before, .*: p ([0-9.]+) -> ([0-9.]+), logit", out)
    assert m and abs(float(m[1]) - float(m[2])) > 1e-3, out


@pytest.mark.parametrize("sae,feature,message", [
    ("sae", "2:32+4", "latent 32 is outside the dictionary (layer 2's SAE at resid_post has 32"),
    ("sae", "1:3+4", "has no SAE at layer 1 (it has layers [0, 2])"),
    ("tc", "1:3+4", "holds transcoders (MLP input -> MLP output), not SAEs"),
    ("other", "1:3+4", "trained for another model"),
    ("crosscoder/layer_0_2_width_16_l0_small", "0:3+4", "holds a crosscoder"),
])
def test_cli_errors_are_one_line_before_the_work(cli_root, capsys, sae, feature, message):
    assert _steer(cli_root, "--sae", str(cli_root / sae), "--feature", feature) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("cltrace steer: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    if sae != "other":  # the set is judged before the model loads
        assert "loading model" not in err


def test_cli_sae_refuses_transcoder_only_options(cli_root, capsys):
    sae = str(cli_root / "sae")
    assert _steer(cli_root, "--sae", sae, "--feature", "0:1+1", "--mode", "frozen") == 2
    assert _steer(cli_root, "--sae", sae, "--transcoders", sae, "--feature", "0:1+1") == 2
    err = capsys.readouterr().err
    assert "--mode frozen needs transcoders" in err and "not both" in err


# --- the real model ------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_trained_sae_steers_the_continuation(real_gemma, tmp_path, capsys):
    """cltrace train --site resid_post on the Gemma 3 270M (layer 6, seconds), then +latent
    steering: the continuation changes, and equals that of a plain hook adding the vector."""
    from cltrace.cli import main
    from cltrace.training.corpus import stdlib_texts

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n\n".join(stdlib_texts(["json", "textwrap", "pathlib"])))
    out = tmp_path / "sae"
    assert main(["train", "--site", "resid_post", "--layers", "6", "--width", "256", "--l0", "16",
                 "--tokens", "2048", "--batch-size", "256", "--buffer-tokens", "1024",
                 "--corpus", str(corpus), "--out", str(out), "--quiet"]) == 0
    saes = load_transcoders(out)
    assert (saes.site_in, sorted(saes.layers), saes.d_sae) == ("resid_post", [6], 256)
    model, tok = real_gemma.model, real_gemma.tokenizer
    st = SaeSteering(model, saes, tokenizer=tok)
    tokens = st.tokenize("The capital of France is")
    # the latent most active on the prompt's last token, pushed to 8x its activation
    sae = st.transcoders.layers[6]
    acts = _latents(sae, _site(model, "resid_post", 6, tokens)[-1:])[0]  # [d_sae]
    f = int(acts.argmax())
    add = 8.0 * max(float(acts[f]), 1.0)
    v = add * sae.W_dec[f, 0]

    def hook(a):
        y = a.clone()
        y[0, 1:] += v
        return y

    got = generate(st, tokens, [Intervention(6, f, add=add)], max_new_tokens=8,
                   steer_generated=True, stop_at_eos=False)
    plain = generate(st, tokens, [], max_new_tokens=8, stop_at_eos=False)
    with reference_hook(model, "resid_post", 6, hook):
        want, _ = greedy(model, tokens, 8)
    assert torch.equal(got.tokens, want)
    assert not torch.equal(got.tokens, plain.tokens), (tok.decode(got.new_tokens), tok.decode(plain.new_tokens))
