"""Image + text graph JSONs for the viewer tests: ``cltrace attribute --image`` run on the tiny
random multimodal Gemma 3 of :mod:`support.tiny_gemma_vision`, with a cross-layer transcoder
calibrated on the prompt's own MLP inputs (so features fire at image positions).

* :func:`picture` — a drawn RGB picture (a red square and a green disc on blue), saved by Pillow;
* :func:`image_setup` — the checkpoint, the picture and the calibrated CLT, saved (and loaded);
* :func:`image_graph_folder` — a served folder holding the graph JSON that ``cltrace attribute
  --image`` wrote, the copy of the image beside it and ``graph-metadata.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

PROMPT = "what is in this picture <start_of_image> red square on a blue"


def picture(path: Path, size: int = 224) -> Path:
    """Write a picture to ``path`` (its suffix picks the format: .png, .ppm, ...): light grey
    background, a red square in the upper left, a green disc in the lower right."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (225, 225, 215))
    d = ImageDraw.Draw(im)
    s = size // 8
    d.rectangle([s, s, 4 * s, 4 * s], fill=(210, 30, 30))
    d.ellipse([5 * s, 5 * s, 7 * s, 7 * s], fill=(40, 170, 60))
    im.save(path)
    return path


class ImageSetup(NamedTuple):
    """What :func:`image_setup` saved under its root, and loaded."""

    model: Path  # the tiny multimodal checkpoint folder (hub layout)
    image: Path  # the picture
    loaded: Any  # cltrace's LoadedMultimodal of ``model`` (fp32, CPU)
    transcoders: Any  # the calibrated CLT (TranscoderSet, fp32)
    transcoder_dir: Path  # the same CLT in circuit-tracer's layout (--transcoders)
    reference: Any  # transformers' Gemma3ForConditionalGeneration of the same weights (the oracle)


def image_setup(root: Path, suffix: str = ".png", **size) -> ImageSetup:
    """The tiny multimodal checkpoint (``size``: its ``image_size`` / ``soft_tokens``, default
    56 pixels, a 2 x 2 grid), a :func:`picture` (``suffix``: its file format) and a CLT
    calibrated on the MLP inputs of :data:`PROMPT` with that picture, saved under ``root``."""
    from cltrace.frozen.capture import capture
    from cltrace.models.anatomy import text_parts
    from cltrace.models.multimodal import load_multimodal

    from .layouts import write_circuit_tracer_clt
    from .tiny_gemma_vision import save_tiny_gemma_vision
    from .transcoders import random_transcoders

    root = Path(root)
    model = root / "model"
    reference = save_tiny_gemma_vision(model, seed=1, **size)
    image = picture(root / f"picture{suffix}")
    lm = load_multimodal(model, device="cpu", dtype=torch.float32)
    prompt = lm.prompt(PROMPT, [str(image)])
    cap = capture(text_parts(lm.model), prompt.input_ids[0], inputs_embeds=lm.embed(prompt)[0],
                  image_groups=prompt.image_groups[0])
    mlp_in = torch.stack([c.mlp_in for c in cap.layers])  # [n_layers, n_pos, d_model]
    tcs = random_transcoders("clt", mlp_in=mlp_in, d_sae=48, skip=True)
    tc_dir = write_circuit_tracer_clt(root / "tcs", tcs.to(dtype=torch.float32))
    return ImageSetup(model, image, lm, tcs, tc_dir, reference)


def image_graph_folder(root: Path, suffix: str = ".png", slug: str = "picture",
                       extra: Sequence[str] = (), **size) -> tuple[Path, Path]:
    """(served folder, graph JSON path): :func:`image_setup` under ``root``, then ``cltrace
    attribute --image`` on :data:`PROMPT` with its picture into ``root/served``; ``extra``:
    more arguments of the command."""
    from cltrace.cli import main

    s = image_setup(root, suffix, **size)
    out = Path(root) / "served"
    argv = ["attribute", PROMPT, "--model", str(s.model), "--transcoders", str(s.transcoder_dir),
            "--out", str(out), "--slug", slug, "--quiet", "--format", "json", "--device", "cpu",
            "--image", str(s.image), *extra]
    if main(argv) != 0:
        raise RuntimeError(f"cltrace {' '.join(argv)} failed")
    return out, out / f"{slug}.json"
