"""The tiny model for the batch tests, saved once and loaded by every worker (local process or
Ray actor) exactly as ``cltrace attribute`` builds its replacement model; and a tokenizer that
kills its process on one prompt, once, to test lost workers."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny_gemma import CharTokenizer, tiny_replacement


class CrashingTokenizer(CharTokenizer):
    """CharTokenizer that ends its process (as a pre-empted worker) the first time it sees
    ``crash_on``; ``marker`` records that it did."""

    def __init__(self, crash_on: str = "", marker: str = "", interrupt_on: str = ""):
        self.crash_on, self.marker, self.interrupt_on = crash_on, marker, interrupt_on

    def __call__(self, text, *a, **k):
        if self.interrupt_on and text == self.interrupt_on:  # as Ctrl-C in the middle of a prompt
            raise KeyboardInterrupt
        if self.crash_on and text == self.crash_on and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(text, *a, **k)

    def encode(self, text, add_special_tokens=True):
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]


def save_tiny(path: Path) -> Path:
    """The CLT tiny model of test_cli's tiny_cli, saved for the workers."""
    rm = tiny_replacement("clt", dtype=torch.float32)
    torch.save({"model": rm.model, "transcoders": rm.transcoders}, path)
    return path


def load_tiny(path: str, crash_on: str = "", marker: str = "", interrupt_on: str = ""):
    """(ReplacementModel, tokenizer) as cltrace's load_replacement makes them for 'tiny'."""
    from cltrace.replacement import ReplacementModel

    saved = torch.load(path, weights_only=False)
    tok = CrashingTokenizer(crash_on, marker, interrupt_on)
    return ReplacementModel(saved["model"], saved["transcoders"], tokenizer=tok, model_name="tiny"), tok


def build_tiny_pages(path: str, out: Path) -> Path:
    """Feature pages of the tiny model's transcoders over a few hundred characters of text."""
    from cltrace.features import FeatureSettings, build_pages
    from cltrace.training.corpus import token_rows

    rm, tok = load_tiny(path)
    texts = ["the cat sat on the mat and the dog sat on the log", "hello world, hello there",
             "abc def ghi jkl mno pqr stu vwx yz", "a crash here and a crash there"] * 4
    rows = token_rows(tok, texts, 16)
    build_pages(rm.model, tok, rm.transcoders, rows, sorted(rm.transcoders.layers), out,
                settings=FeatureSettings(top_k=4, n_samples=4), bar=False)
    return out


def load_tiny_with_pages(path: str, pages: str):
    """(ReplacementModel, tokenizer, FeaturePages): a batch worker that labels its graphs."""
    from cltrace.features import FeaturePages

    return (*load_tiny(path), FeaturePages(pages))


# --- image rows: the tiny multimodal Gemma 3 --------------------------------------------------

IMAGE_PROMPT = "what is in this picture <start_of_image> red square on a blue"


def second_picture(path: Path, size: int = 70) -> Path:
    """A picture unlike :func:`support.image_graphs.picture`: a yellow bar and a blue triangle on
    dark grey, not square (``path``'s suffix picks the format)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size // 2 + 9), (40, 40, 48))
    d = ImageDraw.Draw(im)
    d.rectangle([4, 6, size - 6, 14], fill=(235, 200, 20))
    d.polygon([(10, size // 2 + 4), (size // 2, 18), (size - 8, size // 2 + 4)], fill=(30, 80, 220))
    im.save(path)
    return path


def multimodal_files(root: Path) -> tuple[Path, Path, list[Path]]:
    """(model folder, transcoders folder, two pictures) under ``root``: the tiny random
    multimodal checkpoint in the hub layout (seed 1), a CLT in circuit-tracer's layout
    calibrated on the MLP inputs of :data:`IMAGE_PROMPT` with the first picture (features fire
    at image positions), the pictures as PNG and PPM."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts
    from cltrace.models.multimodal import load_multimodal

    from .image_graphs import picture
    from .layouts import write_circuit_tracer_clt
    from .tiny_gemma_vision import save_tiny_gemma_vision
    from .transcoders import random_transcoders

    root = Path(root)
    model = root / "model"
    save_tiny_gemma_vision(model, seed=1)
    pics = root / "pics"
    pics.mkdir(parents=True, exist_ok=True)
    images = [picture(pics / "a.png"), second_picture(pics / "b.ppm")]
    lm = load_multimodal(model, device="cpu", dtype=torch.float32)
    prompt = lm.prompt(IMAGE_PROMPT, [str(images[0])])
    cap = capture(text_parts(lm.model), prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                  image_groups=prompt.image_groups[0])
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])  # [n_layers, n_pos, d_model]
    tcs = random_transcoders("clt", mlp_in=mlp_in, d_sae=48, skip=True)
    return model, write_circuit_tracer_clt(root / "tcs", tcs.to(dtype=torch.float32)), images
