"""Attribution graphs of image + text prompts on a tiny random multimodal Gemma 3.

The replacement model runs an :class:`~cltrace.models.multimodal.ImagePrompt` (the soft tokens
in place, the bidirectional image mask kept); the oracles are independent of the graph: the
frozen linear model run forward (the completeness identity: each target's value = its incoming
edges + bias terms), the frozen model rerun with a feature removed (interventions), and the
real model's logits. A graph computed under a causal mask breaks them at image positions.
"""
from __future__ import annotations

import pytest
import torch

from cltrace.attribution import attribute
from cltrace.models.multimodal import load_multimodal
from cltrace.replacement import ReplacementModel
from support.completeness import target_values
from support.tiny_gemma import exact_norms
from support.tiny_gemma_vision import IMAGE_SIZE, SOFT, SOFT_TOKENS, save_tiny_gemma_vision
from support.transcoders import random_transcoders

PROMPT = "what is in this picture <start_of_image> the cat sat on a <start_of_image> mat"


def images(n: int = 2):
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 70), (IMAGE_SIZE, IMAGE_SIZE), (90, 33)]
    return [torch.randint(0, 256, (3, *sizes[i % 3]), generator=g, dtype=torch.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(multimodal model in fp64 with exact norms, its two-image prompt, replacement model with
    a CLT calibrated on the prompt's own MLP inputs): the window-3 model, whose images overflow
    the sliding window."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts

    folder = tmp_path_factory.mktemp("tiny-vision") / "narrow"
    save_tiny_gemma_vision(folder, seed=1, window=3)
    lm = load_multimodal(folder, device="cpu", dtype=torch.float64)
    exact_norms(lm.model)
    prompt = lm.prompt(PROMPT, images(2))
    cap = capture(text_parts(lm.model), prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                  image_groups=prompt.image_groups[0])
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])  # [n_layers, n_pos, d_model]
    tcs = random_transcoders("clt", mlp_in=mlp_in, d_sae=48, skip=True)
    return lm, prompt, ReplacementModel.from_multimodal(lm, tcs, dtype=torch.float64)


@pytest.fixture(scope="module")
def graph(setup):
    _, prompt, rm = setup
    return attribute(prompt, rm, batch_size=16, max_feature_nodes=None, prompt_text=PROMPT)


def soft_positions(prompt) -> list[int]:
    return torch.nonzero(prompt.image_groups[0] >= 0).flatten().tolist()


def test_state_of_an_image_prompt(setup):
    """The capture ran on the soft tokens with the image mask: the frozen model is not causal,
    its logits (errors added back) are the real model's, the embeddings are the soft tokens,
    and there are features and error vectors at image positions."""
    lm, prompt, rm = setup
    state = rm.run(prompt)
    assert not state.frozen.causal and torch.equal(state.image_groups.cpu(), prompt.image_groups[0])
    lm.model.set_attn_implementation("eager")
    try:
        ref = lm.logits(prompt)[0]  # [n_pos, vocab]
    finally:
        lm.model.set_attn_implementation("sdpa")
    assert (state.logits - ref).abs().max() <= 1e-9 * ref.abs().max()
    out = state.replacement_forward().logits
    assert (out - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert torch.equal(state.embed, lm.embed(prompt)[0])
    soft = soft_positions(prompt)
    pos = state.active_features().pos
    assert torch.isin(pos, torch.tensor(soft)).sum() > 10
    assert state.errors[:, soft].abs().amax() > 0
    labels = state.labels
    assert [labels[i] for i in soft[:SOFT_TOKENS]] == ["<img 1:0,0>", "<img 1:0,1>", "<img 1:1,0>", "<img 1:1,1>"]


def test_graph_nodes_of_an_image_prompt(setup, graph):
    """One embedding node per position (soft tokens included, named by their cell), every
    active feature a node, the prompt text as given."""
    _, prompt, rm = setup
    n_pos = prompt.input_ids.shape[1]
    state = rm.run(prompt)
    assert graph.n_features == state.active_features().layer.numel()
    assert graph.n_nodes == graph.n_features + (graph.n_layers + 1) * n_pos + graph.n_logits
    assert graph.prompt == PROMPT and len(graph.token_strs) == n_pos
    soft = soft_positions(prompt)
    assert graph.token_strs == rm.images.token_labels(prompt)
    assert all(graph.token_strs[i].startswith("<img ") for i in soft)
    assert graph.token_strs[1] == "what"
    assert int((graph.tokens == SOFT).sum()) == 2 * SOFT_TOKENS


def test_completeness_identity_at_image_positions(setup, graph):
    """Every target's value = the sum of its incoming direct effects + bias terms, for the
    features at, between and after the image positions and for the logits."""
    _, prompt, rm = setup
    state = rm.run(prompt)
    values, biases = target_values(state, graph)
    pre = torch.cat([a.pre_acts for a in state.acts])
    torch.testing.assert_close(values[:graph.n_features], pre.double(), rtol=1e-9, atol=1e-9)
    total = graph.edges.double().sum(1) + biases
    rel = (total - values).abs() / values.abs().clamp_min(1e-3)  # edges are stored in fp32
    soft = torch.tensor(soft_positions(prompt))
    at_image = torch.isin(graph.features[:, 1], soft)
    after = graph.features[:, 1] > soft.max()
    assert at_image.sum() > 10 and after.sum() > 5
    assert rel.max() <= 1e-5, f"completeness identity off by {rel.max():.2e}"


def test_intervention_at_an_image_position(setup, graph):
    """Removing a feature at an image position from the frozen model (attention and norms
    frozen) changes every target by its edge, including targets at EARLIER soft tokens of the
    same image, which only the bidirectional image mask connects."""
    _, prompt, rm = setup
    state = rm.run(prompt)
    values, _ = target_values(state, graph)
    groups = prompt.image_groups[0]
    feats = graph.features
    soft = set(soft_positions(prompt))
    has_out = (graph.edges[:, :graph.n_features] != 0).any(0)
    candidates = [s for s in has_out.nonzero().flatten().tolist() if feats[s, 1].item() in soft]
    # prefer sources with an edge into an earlier position of their image
    backward = [s for s in candidates
                if ((feats[:, 1] < feats[s, 1]) & (groups[feats[:, 1]] == groups[feats[s, 1]])
                    & (graph.edges[:graph.n_features, s] != 0)).any()]
    assert len(backward) >= 3
    for s in backward[:4] + candidates[:2]:
        layer, pos, feat = feats[s].tolist()
        act = float(graph.activations[s])
        tc = state.transcoders.layers[layer]
        n_out = min(tc.n_out, state.n_layers - layer)
        saved = state.recon
        removed = saved.features.clone()
        removed[layer:layer + n_out, pos] -= act * tc.W_dec[feat, :n_out]
        state.recon = saved._replace(features=removed)
        after, _ = target_values(state, graph)
        state.recon = saved
        change = values - after  # [n_targets]: the edge of s into every target
        torch.testing.assert_close(change.float(), graph.edges[:, s], rtol=1e-4, atol=1e-6)


def test_graph_needs_the_bidirectional_mask(setup, graph):
    """The graph has edges from later to earlier soft tokens of one image (impossible under a
    causal mask), and rows computed with the frozen model made causal break the completeness
    identity of the features at the first soft token of each image."""
    from cltrace.attribution.rows import EdgeRows

    _, prompt, rm = setup
    state = rm.run(prompt)
    groups = prompt.image_groups[0]
    feats = graph.features
    nz = (graph.edges[:graph.n_features, :graph.n_features] != 0).nonzero()  # [k, 2]: target, source
    tpos, spos = feats[nz[:, 0], 1], feats[nz[:, 1], 1]
    later = spos > tpos
    assert later.sum() > 0  # and only inside one image: the image rule is the only way back
    assert ((groups[tpos[later]] >= 0) & (groups[tpos[later]] == groups[spos[later]])).all()

    soft = soft_positions(prompt)
    firsts = [p for p in soft if groups[p - 1] < 0]
    idx = torch.nonzero(torch.isin(feats[:, 1], torch.tensor(firsts))).flatten()
    assert idx.numel() >= 2
    values, biases = target_values(state, graph)
    seeds = state.feature_seeds(feats[idx, 0], feats[idx, 1], feats[idx, 2])
    good = EdgeRows(state)(seeds).sum(1) + biases[idx]
    assert ((good - values[idx]).abs() / values[idx].abs().clamp_min(1e-3)).max() <= 1e-9
    state.frozen.causal = True
    try:
        bad = EdgeRows(state)(seeds).sum(1) + biases[idx]
    finally:
        state.frozen.causal = False
    assert ((bad - values[idx]).abs() / values[idx].abs().clamp_min(1e-3)).max() > 1e-3


# --- cltrace attribute --image ------------------------------------------------------------------

def write_ppm(path, image) -> None:
    """``image`` (RGB uint8 [3, H, W]) as a binary PPM file."""
    _, h, w = image.shape
    path.write_bytes(f"P6\n{w} {h}\n255\n".encode() + image.permute(1, 2, 0).contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, setup):
    """(model folder, transcoders folder in circuit-tracer's CLT layout, two PPM images)."""
    from support.layouts import write_circuit_tracer_clt

    lm, _, rm = setup
    root = tmp_path_factory.mktemp("image-cli")
    model = root / "model"
    save_tiny_gemma_vision(model, seed=1, window=3)
    tcs = write_circuit_tracer_clt(root / "tcs", rm.transcoders.to(dtype=torch.float32))
    files = []
    for i, im in enumerate(images(2)):
        files.append(root / f"pic{i}.ppm")
        write_ppm(files[-1], im)
    return model, tcs, files


def test_attribute_cli_with_images(cli_files, tmp_path, capsys):
    """The graph JSON of ``cltrace attribute --image A --image B``: valid against the schema,
    soft tokens as <img i:r,c> prompt tokens and embedding nodes, metadata.info.images naming
    the copies (byte-equal to the inputs) and the positions and grid of each image's soft
    tokens in the prompt the Python API builds."""
    import json

    import jsonschema

    from cltrace.cli import main
    from cltrace.export import GRAPH_SCHEMA_PATH

    model, tcs, files = cli_files
    out = tmp_path / "out"
    argv = ["attribute", PROMPT, "--model", str(model), "--transcoders", str(tcs), "--out", str(out),
            "--slug", "pics", "--quiet", "--format", "json", "--device", "cpu"]
    for f in files:
        argv += ["--image", str(f)]
    assert main(argv) == 0
    data = json.loads((out / "pics.json").read_text())
    jsonschema.validate(data, json.loads(GRAPH_SCHEMA_PATH.read_text()))
    lm = load_multimodal(model, device="cpu")
    prompt = lm.prompt(PROMPT, [str(f) for f in files])
    meta = data["metadata"]
    assert meta["prompt"] == PROMPT and meta["prompt_tokens"] == lm.token_labels(prompt)
    soft = soft_positions(prompt)
    want = []
    for g in range(2):
        pos = torch.nonzero(prompt.image_groups[0] == g).flatten().tolist()
        want.append({"file": f"pics.image{g + 1}.ppm", "grid": [2, 2], "positions": [pos[0], pos[-1]]})
    assert meta["info"]["images"] == want
    for g, f in enumerate(files):
        assert (out / want[g]["file"]).read_bytes() == f.read_bytes()
    emb = {n["ctx_idx"]: n for n in data["nodes"] if n["feature_type"] == "embedding"}
    assert sorted(emb) == list(range(prompt.input_ids.shape[1]))
    assert emb[soft[0]]["clerp"] == 'Emb: "<img 1:0,0>"' and emb[soft[-1]]["clerp"] == 'Emb: "<img 2:1,1>"'
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)


def test_attribute_cli_prepends_placeholders(cli_files, tmp_path, capsys):
    """No <start_of_image> in the text: one per image first; --chat puts it in the user turn."""
    import json

    from cltrace.cli import main

    model, tcs, files = cli_files
    out = tmp_path / "out"
    base = ["attribute", "--model", str(model), "--transcoders", str(tcs), "--out", str(out),
            "--quiet", "--format", "json", "--device", "cpu", "--image", str(files[0])]
    assert main(base + ["the cat sat on a", "--slug", "plain"]) == 0
    assert main(base + ["what is in this picture", "--slug", "chat", "--chat"]) == 0
    lm = load_multimodal(model, device="cpu")
    for slug, text, chat in (("plain", "<start_of_image> the cat sat on a", False),
                             ("chat", "<start_of_image> what is in this picture", True)):
        meta = json.loads((out / f"{slug}.json").read_text())["metadata"]
        prompt = lm.prompt(text, [str(files[0])], chat=chat)
        assert meta["prompt_tokens"] == lm.token_labels(prompt), slug
        pos = soft_positions(prompt)
        assert meta["info"]["images"] == [{"file": f"{slug}.image1.ppm", "grid": [2, 2],
                                           "positions": [pos[0], pos[-1]]}]


def test_attribute_cli_bad_images(cli_files, tmp_path, capsys, monkeypatch):
    """One line, exit 2, before any model loads: not an image, a text-only model, more images
    than placeholders."""
    import cltrace.models.multimodal as mm
    from cltrace.cli import main
    from support.cli import one_line_error
    from support.tiny_gemma import tiny_gemma

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mm, "load_multimodal", no_loading)
    model, tcs, files = cli_files
    text_only = tmp_path / "text-only"
    tiny_gemma(n_layers=2).save_pretrained(text_only)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    base = ["attribute", "--transcoders", str(tcs), "--out", str(tmp_path / "out"), "--quiet"]
    capsys.readouterr()  # what saving the model printed
    cases = [
        (["the <start_of_image> cat", "--model", str(model), "--image", str(bad)], ["notes.png"]),
        (["the <start_of_image> cat", "--model", str(text_only), "--image", str(files[0])], ["text-only"]),
        (["the cat", "--image", str(files[0])], ["gemma-3-270m", "text-only"]),
        (["the <start_of_image> cat", "--model", str(model), "--image", str(files[0]),
          "--image", str(files[1])], ["1 <start_of_image>", "2 image"]),
    ]
    for argv, needles in cases:
        assert main(base + argv) == 2, argv
        one_line_error(capsys, *needles)
    assert not (tmp_path / "out" / "graph-metadata.json").exists()


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
def test_image_graph_and_steering_on_a_device(tmp_path, device):
    """The whole image path on ``device`` (fp32: the multimodal model loaded there, the vision
    tower, the graph, a free-mode intervention at a soft token, a greedy continuation) against
    the same on the CPU: edges and logits to fp32 rounding, the same tokens. On the CPU this
    checks that the two runs of the comparison are independent and equal; the CUDA case is
    what the prepared GPU run (benchmarks/gpu/run.sh) runs."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts
    from cltrace.steering import Intervention, generate, intervene

    folder = tmp_path / "model"
    save_tiny_gemma_vision(folder, seed=1)
    out = {}
    for dev in ("cpu", device):
        lm = load_multimodal(folder, device=dev, dtype=torch.float32)
        prompt = lm.prompt(PROMPT, images(2))
        if "tcs" not in out:  # calibrated once, on the CPU run
            cap = capture(text_parts(lm.model), prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                          image_groups=prompt.image_groups[0])
            out["tcs"] = random_transcoders("clt", mlp_in=torch.stack([c.mlp_in for c in cap.layers]),
                                            d_sae=48, skip=True)
        rm = ReplacementModel.from_multimodal(lm, out["tcs"])
        graph = attribute(prompt, rm, batch_size=64, max_feature_nodes=None, prompt_text=PROMPT)
        soft = soft_positions(prompt)
        state = rm.run(prompt)
        a = state.acts[0]
        at = (a.rows() == soft[-1]).nonzero().flatten()
        iv = Intervention(0, int(a.feat_idx[at[a.acts[at].argmax()]]), pos=soft[-1], set=0.0)
        res = intervene(rm, None, [iv], mode="free", state=state)
        gen = generate(rm, prompt, [iv], max_new_tokens=3, stop_at_eos=False)
        out[dev if dev not in out else "again"] = (graph, res.logits.cpu(), gen.tokens.cpu(), iv)
    (g0, l0, t0, iv0), (g1, l1, t1, iv1) = out["cpu"], out["again" if device == "cpu" else device]
    (f0, e0), (f1, e1) = _canonical(g0), _canonical(g1)
    assert iv0 == iv1 and torch.equal(f0, f1)
    assert (e1 - e0).abs().max() <= 1e-4 * e0.abs().max()
    assert (l1 - l0).abs().max() <= 1e-4 * l0.abs().max()
    assert torch.equal(t0, t1)


def _canonical(graph):
    """(features [n, 3] sorted by (layer, pos, feature), the edges [targets, nodes] with the
    feature rows and columns in that order): a graph whose every feature was visited, compared
    across devices whatever order near-equal influences put them in."""
    f = graph.features.cpu()
    n, N = f.shape[0], graph.n_nodes
    assert graph.edge_targets[:n].cpu().tolist() == list(range(n))  # every feature a target
    order = sorted(range(n), key=lambda i: tuple(f[i].tolist()))
    cols = torch.tensor(order + list(range(n, N)))
    rows = torch.tensor(order + list(range(n, graph.edges.shape[0])))
    return f[order], graph.edges.cpu()[rows][:, cols]
