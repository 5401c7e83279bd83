"""Steering with an image in the prompt (issue 29): feature and SAE-latent interventions on a
multimodal Gemma 3 compute what transformers' ``Gemma3ForConditionalGeneration`` computes with
the same change made by plain hooks on its own modules.

The oracle is transformers on the tiny random checkpoint of :mod:`support.image_graphs` (its
vision tower, projector and language model, fed by ``input_ids``, ``pixel_values`` and
``token_type_ids`` as Gemma 3's processor returns them): logits at every position, and greedy
continuations step by step. An intervention at an image position moves the logits at the
image's *earlier* positions (one image's soft tokens attend both ways) and leaves the text
before the image exactly as it was. The command: ``cltrace steer --image`` prints the image's
positions, the before/after table of the API's numbers, and refuses bad input in one line.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from cltrace.cli import main
from cltrace.replacement import ReplacementModel
from cltrace.steering import Intervention, SaeSteering, generate, intervene
from cltrace.steering.inputs import model_input, state_input
from cltrace.steering.modes import column
from cltrace.transcoders.write import save_gemmascope
from support.image_graphs import PROMPT, image_setup
from support.numerics import torch_threads
from support.tiny_gemma_vision import SOFT
from support.transcoders import random_transcoders


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return image_setup(tmp_path_factory.mktemp("image-steering"))


@pytest.fixture(scope="module")
def prompt(setup):
    return setup.loaded.prompt(PROMPT, [str(setup.image)])


@pytest.fixture(scope="module")
def rm(setup):
    return ReplacementModel.from_multimodal(setup.loaded, setup.transcoders)


def _soft_positions(prompt) -> list[int]:
    return (prompt.image_groups[0] >= 0).nonzero().flatten().tolist()


def _reference(hf, ids, pixel_values) -> torch.Tensor:
    """transformers' logits [n_pos, vocab] on ``ids [n_pos]`` with the image."""
    with torch.no_grad():
        return hf(input_ids=ids[None], pixel_values=pixel_values,
                  token_type_ids=(ids[None] == SOFT).long()).logits[0]


@contextlib.contextmanager
def _ablation_hooks(hf, tcs, layer: int, feature: int, pos: int):
    """On transformers' language model: feature ``feature`` of ``layer`` set to 0 at ``pos``,
    i.e. its activation on this pass's MLP input taken back out of the MLP outputs it decodes
    to (a CLT: layers ``layer`` .. last)."""
    layers = hf.model.language_model.layers
    tc = tcs.layers[layer]
    delta = {}

    def read(_m, _a, out):  # the MLP input of ``layer``: [1, n_pos, d_model]
        z = out[0, pos] @ tc.W_enc[:, feature] + tc.b_enc[feature]
        delta["a"] = z * (z > tc.threshold[feature])

    def write(o):
        def hook(_m, _a, out):
            out = out.clone()
            out[0, pos] -= delta["a"] * tc.W_dec[feature, o]
            return out
        return hook

    handles = [layers[layer].pre_feedforward_layernorm.register_forward_hook(read)]
    for o in range(min(tc.n_out, len(layers) - layer)):
        handles.append(layers[layer + o].post_feedforward_layernorm.register_forward_hook(write(o)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _strongest_image_feature(state, positions):
    """(layer, pos, feature) of the largest activation at the image's last soft token, in the
    first layer (its decodes reach every later layer)."""
    a, pos = state.acts[0], positions[-1]
    rows = a.rows()
    hit = (rows == pos).nonzero().flatten()
    best = hit[a.acts[hit].argmax()]
    return 0, pos, int(a.feat_idx[best])


def test_free_ablation_at_an_image_position_equals_transformers_with_hooks(setup, prompt, rm):
    soft = _soft_positions(prompt)
    state = rm.run(prompt)
    L, pos, f = _strongest_image_feature(state, soft)
    res = intervene(rm, None, [Intervention(L, f, pos=pos, set=0.0)], mode="free", state=state)
    hf = setup.reference
    clean_ref = _reference(hf, prompt.input_ids[0], prompt.pixel_values)
    with _ablation_hooks(hf, setup.transcoders, L, f, pos):
        want = _reference(hf, prompt.input_ids[0], prompt.pixel_values)
    scale = want.abs().max()
    assert (res.clean_logits - clean_ref).abs().max() <= 1e-5 * scale
    assert (res.logits - want).abs().max() <= 1e-5 * scale
    moved = (res.logits - res.clean_logits).abs().amax(-1)  # [n_pos]
    assert moved[soft[0]] > 1e-3 * scale  # an earlier soft token: the image attends both ways
    assert moved[:soft[0]].max() == 0  # the text before the image: untouched, exactly
    n = state.n_pos
    assert column(state.acts[L], f, n)[pos] > 0 and column(res.acts[L], f, n)[pos] == 0


@pytest.mark.parametrize("steer_generated", [False, True])
def test_steered_generation_after_an_image_equals_transformers_greedy(setup, prompt, rm, steer_generated):
    """Greedy continuation from the image prompt, clean and with the ablation (on the prompt's
    position; ``steer_generated`` changes nothing for a fixed position): transformers' model,
    re-run on the whole sequence at each step with the same hooks, picks the same tokens."""
    soft = _soft_positions(prompt)
    L, pos, f = _strongest_image_feature(rm.run(prompt), soft)
    hf, n_new = setup.reference, 5
    for ivs in ([], [Intervention(L, f, pos=pos, set=0.0)]):
        got = generate(rm, prompt, ivs, max_new_tokens=n_new, stop_at_eos=False,
                       steer_generated=steer_generated)
        seq = prompt.input_ids[0]
        hooks = _ablation_hooks(hf, setup.transcoders, L, f, pos) if ivs else contextlib.nullcontext()
        with hooks:
            for _ in range(n_new):
                nxt = _reference(hf, seq, prompt.pixel_values)[-1].argmax()
                seq = torch.cat([seq, nxt[None]])
        assert got.tokens.tolist() == seq.tolist()
        assert got.n_prompt == prompt.input_ids.shape[1]


def test_model_input_extends_with_text_tokens(setup, prompt, rm):
    """An image prompt's input followed by text tokens is what transformers reads for the
    longer sequence: its logits equal transformers' at every position."""
    start = model_input(rm, prompt)
    assert torch.equal(start.tokens, prompt.input_ids[0])
    new = torch.tensor([7, 8, 9])
    longer = start.extend(rm.model, new)
    assert longer.n_pos == start.n_pos + 3 and (longer.image_groups[-3:] == -1).all()
    want = _reference(setup.reference, longer.tokens, prompt.pixel_values)
    assert (longer.logits(rm.model) - want).abs().max() <= 1e-5 * want.abs().max()
    state = rm.run(prompt)
    assert torch.equal(state_input(state).embeds, start.embeds)


@pytest.fixture(scope="module")
def saes(setup, prompt):
    """Random JumpReLU SAEs at resid_post of every layer, calibrated on the image prompt's
    residual stream (transformers' hidden states), so latents fire at image positions."""
    with torch.no_grad():
        out = setup.reference(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                              token_type_ids=(prompt.input_ids == SOFT).long(),
                              output_hidden_states=True)
    resid = torch.stack(out.hidden_states[1:])[:, 0]  # [n_layers, n_pos, d_model] resid_post
    return random_transcoders(mlp_in=resid, site="resid_post", d_sae=32, active=0.3)


def test_sae_latent_added_after_an_image_equals_a_hook_adding_its_decoder_row(setup, prompt, saes):
    """+4 on latent f of layer 1's resid_post SAE at every position but <bos>: transformers'
    logits with ``4 W_dec[f]`` added to layer 1's output there, and the same greedy tokens."""
    st = SaeSteering(setup.loaded.model, saes, tokenizer=setup.loaded.tokenizer,
                     images=setup.loaded)
    iv = Intervention(1, 5, add=4.0)
    v = 4.0 * saes.layers[1].W_dec[5, 0]  # [d_model]
    layer = setup.reference.model.language_model.layers[1]

    def add(_m, _a, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[0, 1:] += v
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer.register_forward_hook(add)
    try:
        want = _reference(setup.reference, prompt.input_ids[0], prompt.pixel_values)
        seq = prompt.input_ids[0]
        for _ in range(4):
            seq = torch.cat([seq, _reference(setup.reference, seq, prompt.pixel_values)[-1].argmax()[None]])
    finally:
        handle.remove()
    got = st.logits(prompt, [iv])
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    gen = generate(st, prompt, [iv], max_new_tokens=4, stop_at_eos=False, steer_generated=True)
    assert gen.tokens.tolist() == seq.tolist()


def _steer(setup, *extra):
    return ["steer", PROMPT, "--model", str(setup.model), "--image", str(setup.image),
            "--device", "cpu", "--quiet", "--max-new-tokens", "3", *extra]


def test_steer_command_with_an_image(setup, prompt, rm, capsys):
    soft = _soft_positions(prompt)
    L, pos, f = _strongest_image_feature(rm.run(prompt), soft)
    iv = Intervention(L, f, pos=pos, set=0.0)
    for mode in ("free", "frozen"):
        assert main(_steer(setup, "--transcoders", str(setup.transcoder_dir), "--mode", mode,
                           "--feature", f"{L}:{f}@{pos}=0")) == 0
        out = capsys.readouterr().out
        assert f"image 1 ({setup.image}): positions {soft[0]}:{soft[-1] + 1} (<img 0,0> .. <img 1,1>)" in out
        res = intervene(rm, prompt, [iv], mode=mode)
        top = int(res.clean_logits[-1].argmax())
        want = (f"logit {float(res.clean_logits[-1, top]):.3f} -> {float(res.logits[-1, top]):.3f}")
        assert want in out, out
        clean = generate(rm, prompt, [], max_new_tokens=3)
        assert f"generated before: {clean.text!r}" in out


def test_steer_command_with_an_image_and_sae_latents(setup, prompt, saes, tmp_path, capsys):
    root = tmp_path / "resid_post_all"
    save_gemmascope(saes, root, l0="small")
    sae_dir = root / "width_32_l0_small"  # the whole set (one folder per layer inside root)
    assert main(_steer(setup, "--sae", str(sae_dir), "--feature", "1:5+4")) == 0
    out = capsys.readouterr().out
    assert "image 1 (" in out and "SAE latents at resid_post" in out
    st = SaeSteering(setup.loaded.model, saes, tokenizer=setup.loaded.tokenizer, images=setup.loaded)
    after = st.logits(prompt, [Intervention(1, 5, add=4.0)])[-1]
    top = int(st.logits(prompt)[-1].argmax())
    assert f"-> {float(after[top]):.3f}" in out


@pytest.mark.parametrize("extra, message", [
    ((), "--image needs --transcoders or --sae"),
    (("--transcoders", "T", "--prompts", "p.txt", "--metric", 'logit-diff:"a","b"'),
     "--image goes with one PROMPT"),
])
def test_steer_image_errors(setup, extra, message, capsys):
    assert main(_steer(setup, "--feature", "0:1=0", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_steer_image_on_a_text_only_model(setup, capsys):
    argv = _steer(setup, "--feature", "0:1=0", "--transcoders", "T")
    argv[argv.index("--model") + 1] = "gemma-3-270m"
    assert main(argv) == 2
    assert "text-only" in capsys.readouterr().err


# --- experiments from the viewer on an image graph -----------------------------------------

def test_viewer_experiment_on_an_image_graph(tmp_path_factory):
    """``cltrace serve`` with the multimodal model replays an image graph with the copy of its
    image: ablating a feature at a soft-token position (frozen mode, other features held)
    moves every logit node by exactly what the graph's edges predict, and the measured change
    equals the API's on the image prompt; a text-only server refuses the graph in one message."""
    import json

    from support.image_graphs import image_graph_folder
    from support.serve import http_json, serving

    root = tmp_path_factory.mktemp("image-experiment")
    folder, path = image_graph_folder(root, extra=("--max-feature-nodes", "1000",
                                                   "--edge-threshold", "1", "--node-threshold", "1"))
    graph = json.loads(path.read_text())
    s = image_setup(root / "again")  # the same seeds: the same model, picture and CLT
    rm = ReplacementModel.from_multimodal(s.loaded, s.transcoders)
    first, last = graph["metadata"]["info"]["images"][0]["positions"]
    feats = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"
             and first <= int(n["node_id"].split("_")[2]) <= last]
    assert feats, "no feature at an image position in the graph"
    L, f, p = map(int, feats[0]["node_id"].split("_"))
    req = {"graph": path.name, "mode": "frozen", "freeze_features": True, "max_new_tokens": 2,
           "interventions": [{"layer": L, "feature": f, "pos": p, "op": "set", "value": 0}]}
    with serving(folder, rm=rm) as url:
        code, body = http_json(f"{url}/api/intervene", req)
    assert code == 200, body
    prompt = s.loaded.prompt(PROMPT, [str(s.image)])
    res = intervene(rm, prompt, [Intervention(L, f, pos=p, set=0.0)], mode="frozen", freeze_features=True)
    after, before = res.logits[-1].double(), res.clean_logits[-1].double()  # [vocab]
    d = (after - after.mean()) - (before - before.mean())
    rows = body["logits"]
    assert rows and all(not r["pruned"] for r in rows)
    scale = max(abs(r["measured"]) for r in rows)
    assert scale > 0
    for r in rows:
        assert abs(r["predicted"] - r["measured"]) <= 1e-4 * scale, r
        assert abs(r["measured"] - float(d[r["token"]])) <= 1e-6 * scale
    assert body["continuation"]["before"] == generate(rm, prompt, [], max_new_tokens=2, seed=0).text

    text_only = ReplacementModel(s.loaded.model, s.transcoders, tokenizer=s.loaded.tokenizer)
    with serving(folder, rm=text_only) as url:
        code, body = http_json(f"{url}/api/intervene", req)
    assert code == 400 and "multimodal --model" in body["error"]


# --- the causal test on a set of prompts with images ----------------------------------------

def _image_set(setup, folder):
    """A prompts file of three rows: the picture with two questions (relative path, and the
    image first for lack of a placeholder) and a text-only row."""
    import json
    import shutil

    folder.mkdir(exist_ok=True)
    shutil.copy(setup.image, folder / "pic.png")
    rows = [{"prompt": PROMPT, "images": "pic.png", "slug": "q1"},
            {"prompt": "what is in this picture", "images": ["pic.png"], "slug": "q2"},
            {"prompt": "the cat sat on a", "slug": "text"}]
    path = folder / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _set_oracle(setup, rm, iv, a, b):
    """{slug: (before, after)} of logit(a) - logit(b) at the last position, free mode, each
    prompt built by hand."""
    lm = setup.loaded
    prompts = {"q1": lm.prompt(PROMPT, [str(setup.image)]),
               "q2": lm.prompt("<start_of_image> what is in this picture", [str(setup.image)]),
               "text": "the cat sat on a"}
    out = {}
    for slug, p in prompts.items():
        res = intervene(rm, p, [iv], mode="free")
        lg = [res.clean_logits[-1].double(), res.logits[-1].double()]
        out[slug] = tuple(float(x[a] - x[b]) for x in lg)
    return out


def test_steer_set_with_image_rows(setup, rm, tmp_path):
    """``steer --prompts SET`` with an ``images`` column: each row's metric before and after
    equals the intervention run by hand on that prompt (with its image, or text only)."""
    import json

    prompts = _image_set(setup, tmp_path / "set")
    soft_first = int((setup.loaded.prompt(PROMPT, [str(setup.image)]).image_groups[0] >= 0).nonzero()[0])
    out = tmp_path / "r.json"
    argv = ["steer", "--prompts", str(prompts), "--model", str(setup.model), "--transcoders",
            str(setup.transcoder_dir), "--device", "cpu", "--feature", "0:3*0", "--metric",
            'logit-diff:"a","square"', "--resamples", "200", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    rows = {r["slug"]: r for r in json.loads(out.read_text())["prompts"]}
    tok = setup.loaded.tokenizer
    a, b = (tok.convert_tokens_to_ids(t) for t in ("a", "square"))
    want = _set_oracle(setup, rm, Intervention(0, 3, scale=0.0), a, b)
    assert set(rows) == set(want)
    for slug, (before, after) in want.items():  # (fp32: the loop's attention is SDPA, eager here)
        assert rows[slug]["before"] == pytest.approx(before, abs=1e-5)
        assert rows[slug]["after"] == pytest.approx(after, abs=1e-5)
    assert soft_first > 0 and any(r["before"] != r["after"] for r in rows.values())


def test_steer_set_image_rows_need_a_multimodal_model(setup, tmp_path, capsys):
    prompts = _image_set(setup, tmp_path / "set")
    argv = ["steer", "--prompts", str(prompts), "--feature", "0:3*0", "--metric",
            'logit-diff:"a","square"', "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"--prompts {prompts} (row 'q1' has images)" in err and "text-only" in err
    assert len(err.splitlines()) == 1
    assert main(argv + ["--model", str(setup.model)]) == 2
    assert "image rows need --transcoders or --sae" in capsys.readouterr().err


@pytest.mark.ray
def test_steer_set_with_image_rows_on_ray(setup, rm, tmp_path):
    """The same set on two Ray actors of a local cluster, each loading the multimodal model
    from its files (the command's picklable loader): the same rows as the local loop."""
    import json
    import os
    from pathlib import Path

    ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")
    import cltrace

    prompts = _image_set(setup, tmp_path / "set")
    base = ["steer", "--prompts", str(prompts), "--model", str(setup.model), "--transcoders",
            str(setup.transcoder_dir), "--device", "cpu", "--feature", "0:3*0", "--metric",
            'logit-diff:"a","square"', "--resamples", "200", "--quiet"]
    with torch_threads(1):  # as each actor (2 CPUs, 2 actors): the same float32 sums
        assert main(base + ["--out", str(tmp_path / "local.json")]) == 0
    package_root = str(Path(cltrace.__file__).resolve().parents[1])
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), package_root,
                                       os.environ.get("PYTHONPATH", "")])}})
    try:
        assert main(base + ["--ray", "--workers", "2", "--out", str(tmp_path / "ray.json")]) == 0
    finally:
        ray.shutdown()
    local, remote = (json.loads((tmp_path / f).read_text()) for f in ("local.json", "ray.json"))
    assert remote["prompts"] == local["prompts"] and remote["summary"] == local["summary"]
