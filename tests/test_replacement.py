"""The local replacement model: exact logits, the linear map and its hand-written backward,
chat-template positions, PLT == CLT(n_out=1), and the completeness identity of pre-activations.

All on a tiny random transformers Gemma 3 (sliding + global layers, GQA) with synthetic
transcoders; one test uses the real Gemma 3 270M (marked ``real_model``).
"""
from __future__ import annotations

import sys

import pytest
import torch

from cltrace.frozen.capture import capture
from cltrace.models.anatomy import text_parts
from cltrace.frozen import EMBED, Seeds
from cltrace.ops import attribution_contract
from cltrace.frozen.attention import BandedPattern
from cltrace.replacement import ReplacementModel
from cltrace.transcoders.base import LayerTranscoder, TranscoderSet
from support.frozen import backward, iter_backward, logit_seeds
from support.tiny_gemma import tiny_gemma
from support.transcoders import random_transcoders

N_POS = 12
D_SAE = 96  # the transcoder width of these tests
VARIANTS = [("plt", False), ("plt", True), ("clt", False), ("clt", True)]
TOL = {torch.float32: 1e-5, torch.float64: 1e-6}  # fp64 limited by Gemma's fp32 norms/softmax


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _setup(dtype):
    """A 5-layer model (2 KV heads, layer 2 global), a prompt and its MLP inputs."""
    model = tiny_gemma(n_layers=5, n_kv=2, dtype=dtype)
    tokens = torch.randint(0, 300, (N_POS,), generator=torch.Generator().manual_seed(0))
    cap = capture(text_parts(model), tokens)
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])
    return model, tokens, mlp_in, dtype


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["f32", "f64"])
def setup(request):
    return _setup(request.param)


@pytest.fixture(scope="module")
def setup64():
    return _setup(torch.float64)


def build(setup, kind, skip, skip_positions=0, **kw):
    model, tokens, mlp_in, dtype = setup
    tcs = random_transcoders(kind, mlp_in=mlp_in, d_sae=D_SAE, skip=skip, **kw)
    rm = ReplacementModel.from_pretrained(model, tcs, skip_positions=skip_positions)
    return rm, rm.run(tokens)


# --- 1. logits reproduced with the error nodes added back -------------------------------

@pytest.mark.parametrize("kind,skip", VARIANTS)
def test_reproduces_logits(setup, kind, skip):
    model, tokens, _, dtype = setup
    _, st = build(setup, kind, skip, skip_positions=2)
    assert st.logits.shape == (N_POS, 300)
    out = st.replacement_forward()
    assert rel_err(out.logits, st.logits) <= TOL[dtype]
    # the captured logits are the real model's (default attention implementation)
    with torch.no_grad():
        assert rel_err(st.logits, model(tokens[None]).logits[0]) <= TOL[dtype]
    # the frozen forward recomputes every MLP input exactly
    assert rel_err(out.mlp_in, st.mlp_in) <= TOL[dtype]
    # without errors it is a different model (the transcoders are random)
    assert rel_err(st.replacement_forward(include_errors=False).logits, st.logits) > 1e-2


def test_state_contents(setup):
    _, st = build(setup, "clt", True)
    n_layers = st.n_layers
    assert st.mlp_in.shape == st.mlp_out.shape == st.errors.shape == (n_layers, N_POS, 64)
    assert len(st.patterns) == n_layers and st.patterns[0].shape == (4, N_POS, N_POS)
    # sliding layer 0 (window 3) vs global layer 2: patterns are causal and rows sum to 1
    P0, P2 = st.patterns[0], st.patterns[2]
    assert torch.allclose(P0.sum(-1), torch.ones_like(P0.sum(-1)), atol=1e-5)
    assert (P0.triu(1) == 0).all() and (P0.tril(-3) == 0).all() and (P2.tril(-3) != 0).any()
    # the sliding layer is stored as its band (the products above ran on it), the global dense
    assert isinstance(st.capture.layers[0].pattern, BandedPattern)
    assert isinstance(st.capture.layers[2].pattern, torch.Tensor)
    c = st.capture.layers[1]
    assert c.scale_in.shape == c.scale_attn.shape == c.scale_pre.shape == c.scale_post.shape == (N_POS,)
    assert st.recon.total.shape == st.errors.shape
    torch.testing.assert_close(st.recon.total + st.errors, st.mlp_out.to(st.errors.dtype))
    af = st.active_features()
    assert af.layer.numel() == sum(a.feat_idx.numel() for a in st.acts) > 0
    L, p, f = int(af.layer[7]), int(af.pos[7]), int(af.feature[7])
    tc = st.transcoders.layers[L]
    z = st.mlp_in[L, p] @ tc.W_enc[:, f] + tc.b_enc[f]
    torch.testing.assert_close(af.value[7], z)


# --- 2. a linear map, and the linearised backward = autograd = finite differences --------

def mixed_seeds(st, gen):
    """Logit seeds at several positions and feature seeds at every layer."""
    logit = logit_seeds(st, torch.tensor([3, 17, 250]), pos=-1)
    logit2 = logit_seeds(st, torch.tensor([5]), pos=4)
    n = 6
    layer = torch.randint(0, st.n_layers, (n,), generator=gen)
    pos = torch.randint(0, N_POS, (n,), generator=gen)
    feat = torch.randint(0, st.transcoders.d_sae, (n,), generator=gen)
    fs = st.feature_seeds(layer, pos, feat)
    return Seeds(*(torch.cat(t) for t in zip(logit, logit2, fs)))


def seed_objectives(st, out, seeds):
    """The scalar each seed differentiates, computed from the frozen forward's outputs."""
    objs = []
    y = st.frozen.k_final(out.resid_final)  # output of the frozen final norm
    for L, p, v in zip(seeds.layer.tolist(), seeds.pos.tolist(), seeds.vec):
        objs.append(y[p] @ v if L == st.n_layers else out.mlp_in[L, p] @ v)
    return torch.stack(objs)


def autograd_vjps(st, seeds, dtype=None):
    """Per seed, (d/d embed, d/d sources) of its objective by autograd through the frozen forward."""
    embed = st.embed.to(dtype or st.embed.dtype).clone().requires_grad_()
    sources = st.sources().clone().requires_grad_()
    out = st.frozen(embed, sources)
    objs = seed_objectives(st, out, seeds)
    return out, objs, [torch.autograd.grad(objs[b], (embed, sources), retain_graph=True) for b in range(seeds.n)]


@pytest.mark.parametrize("kind,skip", VARIANTS)
def test_backward_matches_autograd(setup, kind, skip):
    *_, dtype = setup
    _, st = build(setup, kind, skip, skip_positions=3)
    seeds = mixed_seeds(st, torch.Generator().manual_seed(2))
    grads = backward(st.frozen, seeds)
    out, objs, vjps = autograd_vjps(st, seeds, dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for b, (g_emb, g_src) in enumerate(vjps):
        torch.testing.assert_close(grads.embed[b], g_emb, **tol)
        torch.testing.assert_close(grads.mlp_out[:, b], g_src, **tol)
    # a logit seed's objective is the logit minus its vocabulary mean
    torch.testing.assert_close(objs[0], out.logits[-1, 3] - out.logits[-1].mean(), **tol)


@pytest.mark.parametrize("kind,skip", [("plt", True), ("clt", True)])
def test_linear_and_finite_differences(setup64, kind, skip):
    """In float64 (finite differences need it)."""
    setup = setup64
    *_, dtype = setup
    _, st = build(setup, kind, skip, skip_positions=1)
    g = torch.Generator().manual_seed(3)
    f = lambda e, s: st.frozen(e, s)  # noqa: E731
    e1, e2 = (torch.randn(N_POS, 64, generator=g, dtype=dtype) for _ in range(2))
    s1, s2 = (torch.randn(st.n_layers, N_POS, 64, generator=g, dtype=dtype) for _ in range(2))
    a, b = 0.7, -1.3
    lhs = f(a * e1 + b * e2, a * s1 + b * s2)
    for x, y1, y2 in zip(lhs, f(e1, s1), f(e2, s2)):
        torch.testing.assert_close(x, a * y1 + b * y2, rtol=1e-10, atol=1e-10)
    # directional derivatives of every seed objective at the prompt's inputs
    seeds = mixed_seeds(st, g)
    grads = backward(st.frozen, seeds)
    e0, s0 = st.embed.to(dtype), st.sources()
    de, ds = torch.randn_like(e0), torch.randn_like(s0)
    eps = 1e-3
    fd = (seed_objectives(st, f(e0 + eps * de, s0 + eps * ds), seeds)
          - seed_objectives(st, f(e0 - eps * de, s0 - eps * ds), seeds)) / (2 * eps)
    analytic = (grads.embed * de).sum((1, 2)) + (grads.mlp_out * ds[:, None]).sum((0, 2, 3))
    torch.testing.assert_close(analytic, fd, rtol=1e-8, atol=1e-9)


def test_backward_streams_layers(setup):
    _, st = build(setup, "plt", True)
    seeds = st.feature_seeds(torch.tensor([3, 1]), torch.tensor([5, 9]), torch.tensor([0, 1]))
    steps = list(iter_backward(st.frozen, seeds))
    assert [s.layer for s in steps] == [4, 3, 2, 1, 0, EMBED]
    for s in steps[:-1]:
        assert s.grad.shape == (2, N_POS, 64)
        # a feature at layer L reads no MLP output of layers >= L, and nothing after its position
        assert (s.grad[0] == 0).all() == (s.layer >= 3) and (s.grad[1] == 0).all() == (s.layer >= 1)
        assert (s.grad[0, 6:] == 0).all() and (s.grad[1, 10:] == 0).all()
    with pytest.raises(ValueError, match="positions"):
        list(iter_backward(st.frozen, Seeds(seeds.layer, seeds.pos + 100, seeds.vec)))


# --- 3. chat-template positions carry no features ---------------------------------------

class _StubTokenizer:
    def convert_tokens_to_ids(self, token):
        return {"<start_of_turn>": 105}[token]


def _without_skip(tcs):
    from dataclasses import replace
    return replace(tcs, layers={L: replace(tc, W_skip=None) for L, tc in tcs.layers.items()})


def test_skip_positions(setup):
    model, tokens, mlp_in, dtype = setup
    tcs = random_transcoders("clt", mlp_in=mlp_in, d_sae=D_SAE, skip=True, active=0.5)
    st = ReplacementModel.from_pretrained(model, tcs, skip_positions=4).run(tokens)
    assert st.skip_positions == 4
    for a in st.acts:
        assert (a.row_offsets[:5] == 0).all() and a.feat_idx.numel() > 0
    # positions without nodes: no features, no error node; what the affine skip does not
    # explain of the MLP output is a constant (in bias), the skip stays a linear path
    assert (st.recon.features[:, :4] == 0).all() and (st.recon.skip[:, :4] != 0).any()
    torch.testing.assert_close(st.recon.bias[:, :4] + st.recon.skip[:, :4],
                               st.mlp_out[:, :4].to(st.errors.dtype))
    assert (st.errors[:, :4] == 0).all()
    assert (st.active_features().pos >= 4).all()
    assert rel_err(st.replacement_forward().logits, st.logits) <= TOL[dtype]
    # as in circuit-tracer, the gradient passes through the skip at those positions too
    seeds = st.feature_seeds(torch.tensor([2]), torch.tensor([1]), torch.tensor([0]))
    g = backward(st.frozen, seeds)
    no_skip = ReplacementModel.from_pretrained(model, _without_skip(tcs), skip_positions=4).run(tokens)
    g0 = backward(no_skip.frozen, seeds)
    assert not torch.allclose(g.mlp_out[0, 0, 1], g0.mlp_out[0, 0, 1])  # layer 0 sees the skip of layer 1
    # default ("auto"): <bos> at position 0 of every prompt; 4 for -it models and chat prompts
    assert ReplacementModel(model, tcs).run(tokens).skip_positions == 1
    chat = tokens.clone()
    chat[1] = 105
    assert ReplacementModel(model, tcs, tokenizer=_StubTokenizer()).run(chat).skip_positions == 4
    tcs_it = random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)
    tcs_it.model_name = "tiny-gemma-it"  # an -it model by name
    assert ReplacementModel(model, tcs_it).run(tokens).skip_positions == 4
    assert ReplacementModel(model, tcs, skip_positions=0).run(chat).skip_positions == 0


# --- 4. PLT and CLT through the same path ----------------------------------------------

def test_plt_is_clt_with_one_output(setup):
    model, tokens, mlp_in, dtype = setup
    plt = random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE, skip=True)
    as_clt = TranscoderSet(kind="clt", n_layers=plt.n_layers, layers=dict(plt.layers))
    padded = TranscoderSet(kind="clt", n_layers=plt.n_layers, layers={
        L: LayerTranscoder(tc.W_enc, tc.b_enc, tc.threshold,
                           torch.cat([tc.W_dec, tc.W_dec.new_zeros(tc.d_sae, plt.n_layers - L - 1, 64)], 1),
                           tc.b_dec, tc.W_skip) for L, tc in plt.layers.items()})
    states = [ReplacementModel(model, t, skip_positions=1).run(tokens) for t in (plt, as_clt, padded)]
    ref = states[0]
    seeds = logit_seeds(ref, [1, 2])
    g_ref = backward(ref.frozen, seeds)
    for st in states[1:]:
        for a, b in zip(st.acts, ref.acts):
            assert torch.equal(a.row_offsets, b.row_offsets) and torch.equal(a.feat_idx, b.feat_idx)
            assert torch.equal(a.acts, b.acts)
        assert torch.equal(st.recon.total, ref.recon.total) and torch.equal(st.errors, ref.errors)
        assert torch.equal(st.replacement_forward().logits, ref.replacement_forward().logits)
        g = backward(st.frozen, seeds)
        assert torch.equal(g.mlp_out, g_ref.mlp_out) and torch.equal(g.embed, g_ref.embed)


# --- 5. completeness: a pre-activation is the sum of its inputs' contributions ----------

def contributions(st, grads):
    """Per seed: (features, errors, b_dec, embeddings) contributions, each [B]."""
    B = grads.embed.shape[0]
    feat = grads.embed.new_zeros(B)
    for L in range(st.n_layers):
        g = grads.mlp_out[L].contiguous()  # [B, n_pos, d_model]
        for S in st.transcoders.sources_writing_to(L):
            a = st.acts[S]
            W = st.transcoders.decoder_slice(S, L)  # [d_sae, d_model]
            feat += attribution_contract(g, a.rows(), W, a.feat_idx, a.acts).sum(1)
    err = (grads.mlp_out * st.errors[:, None]).sum((0, 2, 3))
    bias = (grads.mlp_out * st.recon.bias[:, None]).sum((0, 2, 3))
    emb = (grads.embed * st.embed).sum((1, 2))
    return feat, err, bias, emb


@pytest.mark.parametrize("kind,skip", VARIANTS)
def test_completeness(setup, kind, skip):
    *_, dtype = setup
    _, st = build(setup, kind, skip, skip_positions=2)
    af = st.active_features()
    g = torch.Generator().manual_seed(4)
    pick = torch.randperm(af.layer.numel(), generator=g)[:8]
    # active targets (their pre-activation from the encoder) and inactive ones (computed)
    layer = torch.cat([af.layer[pick], torch.tensor([1, 4, 0])])
    pos = torch.cat([af.pos[pick], torch.tensor([0, 11, 5])])
    feat = torch.cat([af.feature[pick], torch.tensor([3, 50, 7])])
    seeds = st.feature_seeds(layer, pos, feat)
    grads = backward(st.frozen, seeds)
    feat_c, err_c, bias_c, emb_c = contributions(st, grads)
    b_enc = torch.stack([st.transcoders.layers[int(L)].b_enc[int(f)] for L, f in zip(layer, feat)])
    total = feat_c + err_c + bias_c + emb_c + b_enc
    # exact identity on the frozen linear model (its MLP inputs) ...
    x = st.replacement_forward().mlp_in  # [n_layers, n_pos, d_model]
    z = torch.stack([x[L, p] @ st.transcoders.layers[L].W_enc[:, f]
                     for L, p, f in zip(layer.tolist(), pos.tolist(), feat.tolist())]) + b_enc
    strict = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(total, z, **strict)
    # ... and, to the real model's precision (fp32 norms inside), on its captured MLP inputs
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-5, atol=1e-6)
    rows = [int((af.layer == L) .logical_and(af.pos == p).logical_and(af.feature == f).nonzero())
            for L, p, f in zip(layer[:8].tolist(), pos[:8].tolist(), feat[:8].tolist())]
    pre = torch.cat([st.acts[L].pre_acts for L in range(st.n_layers)])
    torch.testing.assert_close(total[:8], pre[rows], **tol)
    assert (feat_c[:8] != 0).any() and (err_c != 0).any()
    # layer-0 targets only see embeddings and nothing from MLPs
    assert (feat_c[layer == 0] == 0).all() and (err_c[layer == 0] == 0).all()
    # the same identity for logit targets: logit - mean logit = sum of contributions
    tokens = torch.tensor([0, 42, 299])
    lg = backward(st.frozen, logit_seeds(st, tokens))
    total = sum(contributions(st, lg))
    logits = st.logits[-1].to(dtype)
    torch.testing.assert_close(total, logits[tokens] - logits.mean(), **tol)
    out = st.replacement_forward().logits[-1]
    torch.testing.assert_close(total, out[tokens] - out.mean(), **strict)


# --- errors a user can act on --------------------------------------------------------------

def test_incompatible_transcoders(setup):
    model, tokens, mlp_in, dtype = setup
    with pytest.raises(ValueError, match="d_model"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in[..., :32], d_sae=D_SAE))
    with pytest.raises(ValueError, match="layers"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in[:3], d_sae=D_SAE))
    with pytest.raises(ValueError, match="tokenizer"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)).run("hello")
    with pytest.raises(ValueError, match="token ids"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)).run([1, 2, 300])
    with pytest.raises(ValueError, match="at most 256"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)).run(torch.zeros(257, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        ReplacementModel(model, random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)).run([])


def test_gqa_single_kv_head_and_partial_set():
    model = tiny_gemma(n_layers=3, n_kv=1)
    tokens = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(5))
    mlp_in = torch.stack([c.mlp_in for c in capture(text_parts(model), tokens).layers])
    tcs = random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE, skip=True, layers=[1])  # one layer only
    st = ReplacementModel(model, tcs).run(tokens)
    assert rel_err(st.replacement_forward().logits, st.logits) <= 1e-5
    assert st.acts[0].feat_idx.numel() == 0 and st.acts[1].feat_idx.numel() > 0
    seeds = logit_seeds(st, [7])
    grads = backward(st.frozen, seeds)
    embed = st.embed.clone().requires_grad_()
    sources = st.sources().clone().requires_grad_()
    out = st.frozen(embed, sources)
    obj = out.logits[-1, 7] - out.logits[-1].mean()
    g_emb, g_src = torch.autograd.grad(obj, (embed, sources))
    torch.testing.assert_close(grads.embed[0], g_emb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads.mlp_out[:, 0], g_src, rtol=1e-4, atol=1e-5)


# --- the real Gemma 3 270M --------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.parametrize("kind,skip", [("plt", True), ("clt", False)])
def test_real_gemma_270m_logits(kind, skip, real_gemma):
    """Requirement 1 on the real model: with error nodes, the logits are reproduced."""
    loaded = real_gemma
    tokens = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"][0]
    parts = text_parts(loaded.model)
    assert (parts.n_layers, parts.d_model) == (18, 640)
    mlp_in = torch.stack([c.mlp_in for c in capture(parts, tokens).layers])
    tcs = random_transcoders(kind, mlp_in=mlp_in, d_sae=1024, skip=skip, active=0.02)  # realistic shapes
    rm = ReplacementModel.from_pretrained(loaded.model, tcs, tokenizer=loaded.tokenizer)
    st = rm.run("The capital of France is")
    assert torch.equal(st.tokens.cpu(), tokens)
    assert rel_err(st.replacement_forward().logits, st.logits) <= 1e-5
    assert all(a.feat_idx.numel() > 0 for a in st.acts)
    paris = loaded.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert paris in st.logits[-1].topk(5).indices.tolist()


@pytest.mark.real_model
def test_real_gemma_270m_banded_sliding_window(real_gemma):
    """A prompt longer than the 512-key window: sliding layers keep only their band, and the
    frozen model built on it still reproduces the logits and matches autograd."""
    loaded = real_gemma
    text = " ".join(f"Item {i} is {'red' if i % 3 else 'blue'}." for i in range(125))
    tokens = loaded.tokenizer(text, return_tensors="pt")["input_ids"][0]
    n = tokens.numel()
    assert n > 600
    parts = text_parts(loaded.model)
    mlp_in = torch.stack([c.mlp_in for c in capture(parts, tokens[:64]).layers])
    tcs = random_transcoders("plt", mlp_in=mlp_in, d_sae=256, skip=True, active=0.02)
    st = ReplacementModel(loaded.model, tcs, tokenizer=loaded.tokenizer).run(tokens)
    kinds = [type(c.pattern) for c in st.capture.layers]
    assert kinds.count(BandedPattern) == 15 and kinds.count(torch.Tensor) == 3
    band = st.capture.layers[0].pattern
    assert band.blocks.numel() < n * n * 4  # smaller than dense (1/6 of it at 4096 tokens)
    assert rel_err(st.replacement_forward().logits[-5:], st.logits[-5:]) <= 1e-5
    seeds = Seeds(*(torch.cat(t) for t in zip(
        logit_seeds(st, [100], pos=n - 1), st.feature_seeds(torch.tensor([9]), torch.tensor([n - 2]), torch.tensor([3])))))
    grads = backward(st.frozen, seeds)
    for b, (g_emb, g_src) in enumerate(autograd_vjps(st, seeds)[2]):
        scale = g_src.abs().max()
        torch.testing.assert_close(grads.mlp_out[:, b] / scale, g_src / scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(grads.embed[b] / scale, g_emb / scale, rtol=0, atol=1e-5)


def test_backward_early_positions_only(setup):
    """Seeds all at early positions: the causal truncation still equals autograd."""
    *_, dtype = setup
    _, st = build(setup, "clt", True, skip_positions=1)
    seeds = Seeds(*(torch.cat(t) for t in zip(
        logit_seeds(st, [9], pos=2), st.feature_seeds(torch.tensor([4, 2]), torch.tensor([0, 3]),
                                                     torch.tensor([5, 6])))))
    grads = backward(st.frozen, seeds)
    for b, (g_emb, g_src) in enumerate(autograd_vjps(st, seeds)[2]):
        torch.testing.assert_close(grads.embed[b], g_emb, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads.mlp_out[:, b], g_src, rtol=1e-4, atol=1e-6)
    assert grads.embed.shape == (3, N_POS, 64) and (grads.embed[:, 4:] == 0).all()


def test_from_pretrained_by_name(setup, monkeypatch):
    """Names are handed to cltrace.models.load_model / cltrace.transcoders.load_transcoders."""
    import types

    import cltrace.transcoders

    model, tokens, mlp_in, dtype = setup
    tcs = random_transcoders("plt", mlp_in=mlp_in, d_sae=D_SAE)
    calls = []

    def load_model(name, device=None, dtype=None):
        calls.append(("model", name, device, dtype))
        return types.SimpleNamespace(model=model, tokenizer=_StubTokenizer())

    def load_transcoders(ref, device=None, dtype=None):
        calls.append(("transcoders", ref, device, dtype))
        return tcs

    monkeypatch.setitem(sys.modules, "cltrace.models", types.SimpleNamespace(load_model=load_model))
    monkeypatch.setattr(cltrace.transcoders, "load_transcoders", load_transcoders, raising=False)
    rm = ReplacementModel.from_pretrained("tiny-it", "tiny-plt", device="cpu", dtype=dtype)
    assert calls == [("model", "tiny-it", "cpu", dtype), ("transcoders", "tiny-plt", "cpu", dtype)]
    assert isinstance(rm.tokenizer, _StubTokenizer) and rm.dtype == dtype
    st = rm.run(tokens)
    assert st.skip_positions == 4  # an -it model by name
    assert rel_err(st.replacement_forward().logits, st.logits) <= TOL[dtype]
