"""A tiny random multimodal Gemma 3 (``Gemma3ForConditionalGeneration``) saved in the hub layout.

The model is transformers' own class with a small SigLIP vision tower (56x56 images, 14-pixel
patches: a 4x4 grid of 16 patches, pooled by the projector to 2x2 = 4 soft tokens per image) and
a 4-layer Gemma 3 language model (layers 0, 1, 3 sliding with a window of 6 by default, layer
2 global),
random norm gains so every scale matters. Its folder holds what a hub checkpoint holds:
``config.json`` (``model_type: gemma3``, transformers 5's layout), ``model.safetensors``
(``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
``lm_head`` tied), a word-level tokenizer with Gemma 3's image tokens (``<start_of_image>``,
``<end_of_image>``, ``<image_soft_token>``) and ``preprocessor_config.json`` /
``processor_config.json`` with the fields of google/gemma-3-4b-it's (``do_convert_rgb`` and
``do_pan_and_scan`` null, as there: ``Gemma3Processor`` supplies them). transformers'
``AutoImageProcessor`` / ``AutoProcessor`` load them (``Gemma3ImageProcessorPil``,
``Gemma3Processor``): tests/test_multimodal.py checks it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "the cat sat on a mat what is in this picture red blue green square".split()
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>",
           "<image_soft_token>"]
BOI, EOI, SOFT = 4, 5, 6  # ids of the image tokens
IMAGE_SIZE, PATCH, SOFT_TOKENS = 56, 14, 4
VOCAB = 32  # > len(SPECIAL) + len(WORDS): a few unused rows, as real vocabularies have


def tiny_gemma_vision(seed: int = 0, dtype: torch.dtype = torch.float32, window: int = 6,
                      image_size: int = IMAGE_SIZE, soft_tokens: int = SOFT_TOKENS):
    """A random transformers ``Gemma3ForConditionalGeneration`` (eval mode); ``window``: the
    sliding window of its sliding layers (below 4, one image's soft tokens overflow it);
    ``image_size`` / ``soft_tokens``: a larger input and grid (the viewer's screenshot: 224
    pixels, 64 soft tokens on an 8 x 8 grid)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=image_size, patch_size=PATCH,
                                vision_use_head=False)
    types = ["full_attention" if L == 2 else "sliding_attention" for L in range(4)]
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                layer_types=types, max_position_embeddings=256)
    cfg = Gemma3Config(text_config=text, vision_config=vision.to_dict(),
                       mm_tokens_per_image=soft_tokens, boi_token_index=BOI, eoi_token_index=EOI,
                       image_token_index=SOFT)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and "norm" in name:  # (1 + w) gains: make w matter
                p.normal_(0.0, 0.3)
            elif "mm_input_projection" in name:  # soft tokens of the size of scaled embeddings
                p.normal_(0.0, 1.0)
            elif "mm_soft_emb_norm" in name:
                p.normal_(0.0, 0.3)
            elif p.ndim == 2 and "language_model" in name:
                p.normal_(0.0, 0.15 if "embed" in name else 1.0 / p.shape[1] ** 0.5)
    return model.to(dtype).eval()


def save_tokenizer(folder) -> None:
    """A word-level tokenizer (<bos> prepended) with Gemma 3's image tokens as special tokens,
    named ``boi_token`` / ``eoi_token`` / ``image_token`` as Gemma 3's processor expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL)}
    vocab.update({w: len(SPECIAL) + i for i, w in enumerate(WORDS)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>"}).save_pretrained(folder)


def save_processor_configs(folder, image_size: int = IMAGE_SIZE, soft_tokens: int = SOFT_TOKENS) -> None:
    """``preprocessor_config.json`` and ``processor_config.json`` with the fields (and
    defaults) of google/gemma-3-4b-it's, sized for the tiny tower."""
    folder = Path(folder)
    pre = {"do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None,
           "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
           "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": soft_tokens,
           "image_std": [0.5, 0.5, 0.5], "processor_class": "Gemma3Processor", "resample": 2,
           "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_seq_length": soft_tokens, "processor_class": "Gemma3Processor"}, indent=2))


def save_tiny_gemma_vision(folder, seed: int = 0, window: int = 6, **size):
    """Save the tiny model, its tokenizer and processor configs into ``folder`` (the tensor
    names ``save_pretrained`` writes: those of hub checkpoints, ``language_model.model.*``,
    ``vision_tower.*``, ``multi_modal_projector.*``); returns the transformers model (float32)."""
    model = tiny_gemma_vision(seed, window=window, **size)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    save_processor_configs(folder, **size)
    return model


def transformers5_layout(folder, out) -> None:
    """Copy the checkpoint in ``folder`` to ``out`` with the tensor names of transformers 5's
    modules (``model.language_model.*``, ``model.vision_tower.vision_model.*``,
    ``model.multi_modal_projector.*``): the other layout a multimodal checkpoint comes in."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = Path(out)
    shutil.copytree(folder, out)
    renamed = {}
    for k, t in load_file(str(Path(folder) / "model.safetensors")).items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model."):]
        elif k.startswith("vision_tower."):
            k = "model.vision_tower.vision_model." + k[len("vision_tower."):]
        elif k.startswith("multi_modal_projector."):
            k = "model." + k
        renamed[k] = t
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})
