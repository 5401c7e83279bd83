"""Images in the prompt: a multimodal Gemma 3 loaded by cltrace computes what transformers'
``Gemma3ForConditionalGeneration`` computes.

The oracle is transformers itself, on a tiny random checkpoint saved in the hub layout
(:mod:`support.tiny_gemma_vision`): the same logits (fp32 rounding), the same attention masks
(its ``create_masks_for_vision_model``), the same weights read back from both tensor layouts.
The bidirectional mask among one image's soft tokens is shown to matter: with it dropped the
logits at image positions move far beyond rounding. Image files (Pillow: RGB of several sizes,
RGBA, gray, palette, JPEG) give the pixel values of transformers' ``Gemma3Processor`` loaded
from the checkpoint folder, bit for bit, and an image file + text prompt the logits of
``Gemma3ForConditionalGeneration`` fed by that processor.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cltrace.errors import UsageError
from cltrace.models.gemma3_parts import attention_masks
from cltrace.models.images import ImagePreprocessor, read_image
from cltrace.models.multimodal import check_multimodal, load_multimodal
from support.tiny_gemma_vision import (IMAGE_SIZE, SOFT, SOFT_TOKENS, save_tiny_gemma_vision,
                                       transformers5_layout)

PROMPT = "what is in this picture <start_of_image> the cat sat on a <start_of_image> mat"


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    """{layout or window: (folder, transformers model)}: the hub layout (window 6), the same
    weights in transformers 5's layout, and a model whose window (3) is shorter than an image."""
    root = tmp_path_factory.mktemp("tiny-gemma-vision")
    hf = save_tiny_gemma_vision(root / "hub")
    transformers5_layout(root / "hub", root / "tf5")
    narrow = save_tiny_gemma_vision(root / "narrow", seed=1, window=3)
    return {"hub": (root / "hub", hf), "tf5": (root / "tf5", hf), "narrow": (root / "narrow", narrow)}


def _images(n: int = 2):
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 70), (IMAGE_SIZE, IMAGE_SIZE), (90, 33)]
    return [torch.randint(0, 256, (3, *sizes[i % 3]), generator=g, dtype=torch.uint8) for i in range(n)]


def _transformers_logits(hf, prompt):
    token_type_ids = (prompt.input_ids == SOFT).long()  # what Gemma 3's processor returns
    with torch.no_grad():
        return hf(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                  token_type_ids=token_type_ids).logits


@pytest.mark.parametrize("which", ["hub", "tf5", "narrow"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_transformers(tiny_vision, which, attn):
    folder, hf = tiny_vision[which]
    lm = load_multimodal(folder, device="cpu")
    lm.model.set_attn_implementation(attn)
    prompt = lm.prompt(PROMPT, _images(2))
    assert int((prompt.input_ids == SOFT).sum()) == 2 * SOFT_TOKENS
    ours, ref = lm.logits(prompt), _transformers_logits(hf, prompt)
    assert ours.shape == ref.shape == (1, prompt.input_ids.shape[1], hf.config.text_config.vocab_size)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bidirectional_mask_matters(tiny_vision):
    """Causal attention among the soft tokens is a different function: the first soft token
    of each image (which sees its image's later tokens only through the image rule) moves."""
    folder, hf = tiny_vision["hub"]
    lm = load_multimodal(folder, device="cpu")
    prompt = lm.prompt(PROMPT, _images(2))
    ref = _transformers_logits(hf, prompt)
    causal = lm.logits(prompt, bidirectional=False)
    first = [int(i) for i in torch.nonzero(prompt.image_groups[0] >= 0).flatten()
             if prompt.image_groups[0, i - 1] < 0]
    assert len(first) == 2
    gap = (causal - ref)[0, first].abs().amax(-1)  # [2]
    assert (gap > 1e-2 * ref.abs().max()).all()
    before = int(torch.nonzero(prompt.image_groups[0] >= 0).min())
    assert (causal - ref)[0, :before].abs().max() <= 1e-5 * ref.abs().max()  # text before: same


@pytest.mark.parametrize("window", [3, 6])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_masks_equal_transformers(window, attn):
    """cltrace's masks with image groups are transformers' (global: causal | same image;
    sliding: window & (causal | same image)), two images, one longer than the window."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import (create_masks_for_vision_model,
                                                            get_block_sequence_ids_for_mask)

    from cltrace.models.gemma3_config import config_from_dict
    from cltrace.models.vision import ImageTokenIds, VisionInput

    hf_cfg = Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                              sliding_window=window, hidden_size=8, head_dim=4,
                              num_attention_heads=2, num_key_value_heads=1)
    hf_cfg._attn_implementation = attn
    cfg = config_from_dict(hf_cfg.to_dict(), "test")
    cfg._attn_implementation = attn
    ids = torch.tensor([[2, 9, 4, 6, 6, 6, 6, 5, 9, 4, 6, 6, 6, 6, 6, 5, 9]])  # images of 4 and 5
    x = torch.zeros(1, ids.shape[1], 8)
    ref = create_masks_for_vision_model(
        config=hf_cfg, inputs_embeds=x, attention_mask=None, cache=None,
        position_ids=torch.arange(ids.shape[1])[None],
        block_sequence_ids=get_block_sequence_ids_for_mask((ids == 6).long()))
    vision = VisionInput(torch.nn.Identity(), torch.nn.Identity(), ImageTokenIds(4, 5, 6, 4), 56)
    ours = attention_masks(cfg, x, None, 0, vision.image_groups(ids))
    for t in ("sliding_attention", "full_attention"):
        assert torch.equal(ours[t], ref[t].expand_as(ours[t])), t


def test_loader_reads_both_layouts(tiny_vision):
    """Every weight of the language model, vision tower and projector comes back from the
    hub layout and from transformers 5's layout, equal to the saved model's."""
    _, hf = tiny_vision["hub"]
    want = {k: v for k, v in hf.state_dict().items()}
    for which in ("hub", "tf5"):
        lm = load_multimodal(tiny_vision[which][0], device="cpu")
        text = {"model.language_model." + k[len("model."):]: v
                for k, v in lm.model.state_dict().items() if k.startswith("model.")}
        vision = {"model." + k: v for k, v in lm.vision.state_dict().items()}
        got = {**text, **vision, "lm_head.weight": lm.model.lm_head.weight}
        assert set(got) == set(want), which
        for k, v in want.items():
            assert torch.equal(got[k], v), (which, k)


def test_text_path_unchanged(tiny_vision):
    """A prompt without an image gives the same logits as transformers on its tokens (the
    masks without image groups are the text masks)."""
    folder, hf = tiny_vision["hub"]
    lm = load_multimodal(folder, device="cpu")
    prompt = lm.prompt("the cat sat on a mat what is in this picture", [])
    assert (prompt.image_groups < 0).all()
    ours = lm.logits(prompt)
    with torch.no_grad():
        ref = hf(input_ids=prompt.input_ids).logits
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_chat_turn_with_an_image(tiny_vision):
    """With ``chat`` the prompt is one user turn (the tiny tokenizer has no template: Gemma 3's
    fixed turn format), one <bos>, the image expanded inside the turn."""
    from cltrace.models.chat import chat_prompt

    lm = load_multimodal(tiny_vision["hub"][0], device="cpu")
    prompt = lm.prompt("the cat <start_of_image>", _images(1), chat=True)
    ids = prompt.input_ids[0].tolist()
    assert ids.count(2) == 1 and ids[0] == 2
    assert ids.count(SOFT) == SOFT_TOKENS and ids[ids.index(SOFT) - 1] == 4
    want = lm.tokenizer(chat_prompt(lm.tokenizer, "the cat <start_of_image>"),
                        add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i not in (SOFT, 5)] == want  # the turn around the image tokens


def test_token_labels_name_patch_cells(tiny_vision):
    lm = load_multimodal(tiny_vision["hub"][0], device="cpu")
    two = lm.prompt(PROMPT, _images(2))
    labels = lm.token_labels(two)
    soft = [lab for lab, t in zip(labels, two.input_ids[0].tolist()) if t == SOFT]
    assert soft == [f"<img {i}:{r},{c}>" for i in (1, 2) for r in range(2) for c in range(2)]
    assert labels[1] == "what" and len(labels) == two.input_ids.shape[1]
    one = lm.token_labels(lm.prompt("the <start_of_image> cat", _images(1)))
    assert [lab for lab in one if lab.startswith("<img")] == ["<img 0,0>", "<img 0,1>",
                                                             "<img 1,0>", "<img 1,1>"]


def test_placeholder_count_must_match(tiny_vision):
    lm = load_multimodal(tiny_vision["hub"][0], device="cpu")
    with pytest.raises(UsageError, match="1 <start_of_image> placeholder.*2 image"):
        lm.prompt("the <start_of_image> cat", _images(2))
    with pytest.raises(UsageError, match="image 0: .*uint8"):
        lm.prompt("the <start_of_image> cat", [_images(1)[0].float()])


def test_text_only_checkpoint_refused(tmp_path):
    from support.tiny_gemma import tiny_gemma

    tiny_gemma(n_layers=2).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="text-only"):
        check_multimodal(tmp_path)
    with pytest.raises(UsageError, match="text-only"):
        load_multimodal("gemma-3-270m")


# --- image files and preprocessing: transformers' own processor is the oracle ------------------

def _pattern(h: int, w: int, c: int, seed: int) -> np.ndarray:
    """``[H, W, C]`` uint8: smooth waves plus noise (resizing it rounds differently per pixel)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    waves = np.stack([127 + 120 * np.sin(x / (7 + k) + y / (5 + 2 * k) + k) for k in range(c)], -1)
    return np.clip(waves + rng.normal(0, 10, (h, w, c)), 0, 255).astype(np.uint8)


_KINDS = ("wide_large.png", "tall_small.png", "at_size.png", "rgba.png", "gray.png",
          "gray_alpha.png", "palette.png", "palette_transparent.png", "photo.jpg")


def _image_kinds():
    """{file name: Pillow image}: RGB larger / smaller / at the tower's size, non-square, RGBA,
    gray, gray + alpha, palette (with and without a transparent entry), JPEG."""
    from PIL import Image

    alpha = _pattern(45, 70, 4, 4)
    alpha[:5, :, 3] = 0  # fully transparent rows: white after the conversion
    alpha[5:10, :, 3] = 255  # opaque rows: the colour itself
    transparent = Image.fromarray(_pattern(64, 64, 3, 7)).quantize(colors=16)
    transparent.info["transparency"] = 3
    kinds = {"wide_large.png": Image.fromarray(_pattern(170, 300, 3, 0)),
            "tall_small.png": Image.fromarray(_pattern(70, 40, 3, 1)),
            "at_size.png": Image.fromarray(_pattern(IMAGE_SIZE, IMAGE_SIZE, 3, 2)),
            "rgba.png": Image.fromarray(alpha),
            "gray.png": Image.fromarray(_pattern(80, 60, 1, 3)[..., 0]),
            "gray_alpha.png": Image.fromarray(_pattern(80, 60, 4, 5)).convert("LA"),
            "palette.png": Image.fromarray(_pattern(100, 75, 3, 6)).quantize(colors=32),
            "palette_transparent.png": transparent,
            "photo.jpg": Image.fromarray(_pattern(120, 160, 3, 8))}
    assert tuple(kinds) == _KINDS
    return kinds


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """{file name: path} of :func:`_image_kinds`, saved by Pillow."""
    root = tmp_path_factory.mktemp("images")
    out = {}
    for name, im in _image_kinds().items():
        extra = {"transparency": im.info["transparency"]} if "transparency" in im.info else {}
        im.save(root / name, **extra)
        out[name] = root / name
    return out


def test_processor_files_load_with_transformers(tiny_vision):
    """The tiny checkpoint's processor files load with transformers' Auto classes, as the
    image processor cltrace uses (PIL backend) and Gemma 3's full processor."""
    from transformers import AutoImageProcessor, AutoProcessor

    from cltrace.models.images import ImagePreprocessor

    folder = tiny_vision["hub"][0]
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "Gemma3ImageProcessorPil"
    assert type(AutoProcessor.from_pretrained(folder)).__name__ == "Gemma3Processor"
    pre = ImagePreprocessor.from_folder(folder, IMAGE_SIZE)
    assert type(pre.processor).__name__ == "Gemma3ImageProcessorPil"
    assert pre.size == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(UsageError, match="preprocessor_config.json: the processor makes 56x56"):
        ImagePreprocessor.from_folder(folder, 2 * IMAGE_SIZE)


@pytest.mark.parametrize("name", _KINDS)
def test_pixel_values_equal_transformers_processor(tiny_vision, image_files, name):
    """cltrace's pixel values of an image file are those of transformers' Gemma3Processor
    loaded from the checkpoint folder, bit for bit, for every kind of file; for RGB files also
    those of the bare image processor with the checkpoint's settings untouched."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor

    folder = tiny_vision["hub"][0]
    lm_pre = ImagePreprocessor.from_folder(folder, IMAGE_SIZE)
    ours = lm_pre([read_image(image_files[name])])
    assert ours.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and ours.dtype == torch.float32
    with Image.open(image_files[name]) as im:
        ref = AutoProcessor.from_pretrained(folder)(text="<start_of_image>", images=[[im]],
                                                    return_tensors="pt")["pixel_values"]
        assert torch.equal(ours, ref)
        if im.mode == "RGB":
            bare = AutoImageProcessor.from_pretrained(folder)(im, return_tensors="pt")
            assert torch.equal(ours, bare["pixel_values"])


def test_pixel_values_by_formula(image_files):
    """Independent of transformers: at the tower's size there is no resize, and the values are
    ``(x / 255 - 0.5) / 0.5``; RGBA is composited onto white (transparent -> 255, opaque ->
    its colour); gray is repeated over the three channels."""
    from PIL import Image

    pre = ImagePreprocessor.from_folder(None, IMAGE_SIZE)  # Gemma 3's defaults
    x = _pattern(IMAGE_SIZE, IMAGE_SIZE, 3, 2)
    want = (torch.from_numpy(x).permute(2, 0, 1).double() / 255 - 0.5) / 0.5
    got = pre([read_image(image_files["at_size.png"])])[0]
    assert (got.double() - want).abs().max() < 1e-6
    rgba = np.asarray(Image.open(image_files["rgba.png"]))  # [H, W, 4]
    rgb = read_image(image_files["rgba.png"]).permute(1, 2, 0).numpy()
    assert (rgb[:5] == 255).all() and np.array_equal(rgb[5:10], rgba[5:10, :, :3])
    gray = np.asarray(Image.open(image_files["gray.png"]))
    assert np.array_equal(read_image(image_files["gray.png"]).numpy(), np.stack([gray] * 3))


def test_tensor_image_equals_its_file(tiny_vision, image_files):
    """An image given as RGB uint8 tensor is preprocessed exactly as the file it came from."""
    lm_pre = ImagePreprocessor.from_folder(tiny_vision["hub"][0], IMAGE_SIZE)
    for name in ("wide_large.png", "rgba.png", "palette.png"):
        t = read_image(image_files[name])
        assert t.dtype == torch.uint8 and t.shape[0] == 3
        assert torch.equal(lm_pre([t]), lm_pre([read_image(image_files[name])]))
    assert lm_pre([]).shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_image_files_end_to_end_equal_transformers(tiny_vision, image_files, attn):
    """Two image FILES (an RGBA PNG larger than the tower's size, a small JPEG) in a prompt:
    cltrace's tokens and pixel values are Gemma3Processor's, and its logits are those of
    transformers' Gemma3ForConditionalGeneration fed by that processor (fp32 rounding)."""
    from PIL import Image
    from transformers import AutoProcessor

    folder, hf = tiny_vision["hub"]
    files = [image_files["rgba.png"], image_files["tall_small.png"]]
    lm = load_multimodal(folder, device="cpu")
    lm.model.set_attn_implementation(attn)
    prompt = lm.prompt(PROMPT, files)
    images = [Image.open(f) for f in files]
    ref_in = AutoProcessor.from_pretrained(folder)(text=PROMPT, images=[images], return_tensors="pt")
    assert torch.equal(prompt.input_ids, ref_in["input_ids"])
    assert torch.equal(prompt.pixel_values, ref_in["pixel_values"])
    with torch.no_grad():
        ref = hf(**ref_in).logits
    ours = lm.logits(prompt)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_not_an_image(tmp_path, image_files):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(UsageError, match="notes.png: not an image Pillow can read"):
        read_image(bad)
    with pytest.raises(UsageError, match="missing.png: no such image file"):
        read_image(tmp_path / "missing.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(image_files["wide_large.png"].read_bytes()[:2000])
    with pytest.raises(UsageError, match="cut.png: not an image Pillow can read"):
        read_image(cut)


def test_without_pillow(tiny_vision, image_files, monkeypatch):
    """Without Pillow: one line saying what to install, from reading an image and from the
    checkpoint check that runs before a multimodal model loads."""
    import sys

    for mod in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # import PIL.X raises ImportError
    with pytest.raises(UsageError, match=r"needs Pillow: pip install 'cltrace\[models\]'"):
        read_image(image_files["gray.png"])
    with pytest.raises(UsageError, match="needs Pillow"):
        check_multimodal(tiny_vision["hub"][0])


# --- the frozen linear model of an image prompt -----------------------------------------------

@pytest.fixture(scope="module")
def frozen_image_prompt(tiny_vision):
    """(multimodal model in fp64 with exact norms, its image prompt, the capture, the frozen
    linear model): the window-3 model, whose images overflow the sliding window."""
    from cltrace.frozen.capture import capture
    from cltrace.frozen.model import FrozenLinearModel
    from cltrace.models.anatomy import text_parts
    from support.tiny_gemma import exact_norms

    lm = load_multimodal(tiny_vision["narrow"][0], device="cpu", dtype=torch.float64)
    exact_norms(lm.model)
    prompt = lm.prompt(PROMPT, _images(2))
    parts = text_parts(lm.model)
    cap = capture(parts, prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                  image_groups=prompt.image_groups[0])
    return lm, prompt, cap, FrozenLinearModel(parts, cap, torch.float64)


def test_capture_of_image_prompt(frozen_image_prompt):
    """The capture runs the model with the image mask (its logits are the model's), keeps the
    soft tokens as the embeddings, and the frozen model replays it exactly."""
    lm, prompt, cap, fz = frozen_image_prompt
    lm.model.set_attn_implementation("eager")  # the capture's (softmax in fp32, as transformers)
    try:
        ref = lm.logits(prompt)[0]
    finally:
        lm.model.set_attn_implementation("sdpa")
    assert cap.has_images and not fz.causal
    assert (cap.logits - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert torch.equal(cap.embed, lm.embed(prompt)[0])
    P = cap.layers[0].pattern  # sliding layer: soft tokens see later soft tokens of their image
    first = int(torch.nonzero(prompt.image_groups[0] >= 0).min())
    assert P[:, first, first + 1].min() > 0 and P[:, first - 1, first].max() == 0
    out = fz(cap.embed, torch.stack([c.mlp_out for c in cap.layers]))
    assert (out.logits - cap.logits).abs().max() <= 1e-9 * ref.abs().max()


def _completeness_gap(fz, cap, positions):
    """max over seeds of |seed . output - Σ (gradient . input)|, relative to the outputs: the
    frozen model is linear in (embeddings, MLP outputs), so the backward's gradients dotted
    with them must give back each seed's output."""
    from cltrace.frozen.model import EMBED, Seeds

    pos = torch.tensor(positions)
    tok = cap.logits[pos].argmax(-1)
    vec = fz.logit_direction(tok)
    seeds = Seeds(torch.full_like(pos, fz.n_layers), pos, vec)
    out = (fz.k_final(cap.resid_final)[pos] * vec).sum(-1)  # [B]
    total = torch.zeros_like(out)
    for step in fz.iter_backward_live(seeds):
        n = step.start + step.grad.shape[1]
        x = cap.embed if step.layer == EMBED else cap.layers[step.layer].mlp_out
        total[:step.grad.shape[0]] += (step.grad * x[step.start:n]).sum((1, 2))
    return ((total - out).abs().max() / out.abs().max()).item()


def test_completeness_at_image_positions(frozen_image_prompt):
    """Seeds at the first soft token of each image, inside an image and at the last position:
    the identity holds; a backward that assumed causal attention (positions after the seed
    dropped) breaks it at the image positions."""
    lm, prompt, cap, fz = frozen_image_prompt
    groups = prompt.image_groups[0]
    soft = torch.nonzero(groups >= 0).flatten().tolist()
    firsts = [i for i in soft if groups[i - 1] < 0]
    positions = firsts + [soft[1], prompt.input_ids.shape[1] - 1]
    assert _completeness_gap(fz, cap, positions) < 1e-9
    fz.causal = True
    try:
        assert _completeness_gap(fz, cap, [firsts[0]]) > 1e-3
    finally:
        fz.causal = False


def test_cached_decoding_after_an_image_prompt(tiny_vision):
    """Generation: the prompt's pass (image groups) fills the KV cache; a new text token then
    needs no image rule (it is not a soft token), and its logits equal a full pass over the
    prompt and that token."""
    lm = load_multimodal(tiny_vision["narrow"][0], device="cpu")
    prompt = lm.prompt(PROMPT, _images(2))
    with torch.no_grad():
        first = lm.model(inputs_embeds=lm.embed(prompt), image_groups=prompt.image_groups,
                         use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        step = lm.model(input_ids=nxt, past_key_values=first.past_key_values).logits[0, -1]
        ids = torch.cat([prompt.input_ids, nxt], 1)
        full = lm.model(inputs_embeds=lm.vision.embed(lm.model, ids, prompt.pixel_values),
                        image_groups=lm.vision.image_groups(ids)).logits[0, -1]
    assert (step - full).abs().max() <= 1e-5 * full.abs().max()
