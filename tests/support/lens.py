"""What the lens tests build on: a tiny Gemma 3 with random dictionaries at every SAE site
(and a crosscoder), calibrated on the model's own activations, written in the Gemma Scope 2
layout and loaded back; and a plain hook-based reference encode. For image prompts: the tiny
multimodal checkpoint with dictionaries calibrated on an image prompt, and the site activations
of transformers' own Gemma3ForConditionalGeneration from hooks."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .tiny_gemma import TOKENS
from .transcoders import random_transcoders

LENS_TOKENS = TOKENS + [77, 140, 2, 63]  # a second <bos> inside: flagged like the first


def hook_activations(model, site: str, ids: Tensor) -> Tensor:
    """The activation at ``site`` of every layer, ``[n_layers, T, width]``, from plain forward
    hooks on the transformers modules (not cltrace's site_hooks)."""
    layers = model.model.layers
    got = {}

    def keep(L, where):
        def hook(_m, args, out=None):
            got[L] = (args[0] if where == "input" else (out[0] if isinstance(out, tuple) else out)).detach()
        return hook

    handles = []
    for L, block in enumerate(layers):
        if site == "resid_post":
            handles.append(block.register_forward_hook(lambda m, a, o, f=keep(L, "output"): f(m, a, o)))
        elif site == "attn_out":
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(keep(L, "input")))
        elif site == "mlp_out":
            handles.append(block.post_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, f=keep(L, "output"): f(m, a, o)))
        else:
            handles.append(block.pre_feedforward_layernorm.register_forward_hook(
                lambda m, a, o, f=keep(L, "output"): f(m, a, o)))
    try:
        with torch.no_grad():
            model(torch.as_tensor(ids)[None])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([got[L][0] for L in range(len(layers))])


def reference_encode(x: Tensor, tc) -> Tensor:
    """Dense JumpReLU activations ``[T, d_sae]``: relu(x @ W_enc + b_enc) * (pre > threshold)."""
    pre = x @ tc.W_enc + tc.b_enc
    return torch.relu(pre) * (pre > tc.threshold)


def wide_heads_gemma(n_layers: int = 3, head_dim: int = 24):
    """The tiny Gemma 3 of :func:`support.tiny_gemma.tiny_gemma` (same seed and init) but with
    4 heads of ``head_dim``: its attn_out site (heads x head_dim = 96) is wider than d_model (64)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    types = ["full_attention" if L % 3 == 2 else "sliding_attention" for L in range(n_layers)]
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=head_dim, sliding_window=3, layer_types=types,
                           max_position_embeddings=256)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
            elif p.ndim == 2:
                p.normal_(0.0, 0.15 if "embed" in name else 1.0 / p.shape[1] ** 0.5)
    return model.eval()


def lens_setup(tmp_path, n_layers: int = 3, d_sae: int = 40):
    """(tiny model with attn_out 96 wide and d_model 64, {name: set loaded back from the Gemma
    Scope 2 layout}): SAEs at resid_post, attn_out and mlp_out, and a crosscoder over layers 0
    and 2, each calibrated so that about 15 % of its latents fire."""
    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.write import save_gemmascope

    model = wide_heads_gemma(n_layers=n_layers)
    out = {}
    for site in ("resid_post", "attn_out", "mlp_out"):
        acts = hook_activations(model, site, torch.tensor(LENS_TOKENS))
        ts = random_transcoders(mlp_in=acts, d_sae=d_sae, site=site, seed=11)
        root = save_gemmascope(ts, tmp_path / f"{site}_all")
        out[site] = load_transcoders(root, model_config=model)
    acts = hook_activations(model, "resid_post", torch.tensor(LENS_TOKENS))
    cc = random_transcoders(mlp_in=acts, d_sae=d_sae, sites=[0, 2], seed=12)
    root = save_gemmascope(cc, tmp_path / "crosscoder" / f"layer_0_2_width_{d_sae}_l0_medium")
    out["crosscoder"] = load_transcoders(root, model_config=model)
    return model, out


def write_pages(folder, layers, d_sae: int):
    """A feature pages folder (as ``cltrace features`` writes) whose every latent has a page
    labelled ``"L{layer} f{index}"`` (the hand-written page of :func:`support.serve.feature_page`)."""
    from cltrace.features.store import PageWriter

    from .serve import feature_page

    w = PageWriter(folder, json_files=False)
    for L in layers:
        w.begin_layer(L, d_sae)
        for f in range(d_sae):
            w.add(f, {**feature_page(f), "label": f"L{L} f{f}", "label_examples": 2})
        w.end_layer()
    w.close({"model": "tiny"})
    return folder


IMAGE_PROMPT = "what is in this picture <start_of_image> the cat sat on a mat"
LM_SITES = ("resid_post", "attn_out", "mlp_out", "mlp_in")


def hf_multimodal_sites(hf, prompt, bidirectional: bool = True) -> dict[str, Tensor]:
    """``{site: [n_layers, T, width]}`` at every layer of the language model of transformers'
    ``Gemma3ForConditionalGeneration`` ``hf`` on an image prompt (``prompt``: input_ids and
    pixel_values), from plain forward hooks on its modules. ``bidirectional``: with the
    processor's ``token_type_ids`` (1 at soft tokens: transformers' bidirectional image
    mask); False: without them (transformers then attends causally everywhere)."""
    from .tiny_gemma_vision import SOFT

    layers = hf.model.language_model.layers
    got: dict[tuple[str, int], Tensor] = {}

    def out_hook(site, L):
        def hook(_m, _a, out):
            got[(site, L)] = (out[0] if isinstance(out, tuple) else out).detach()
        return hook

    def in_hook(site, L):
        def hook(_m, args):
            got[(site, L)] = args[0].detach()
        return hook

    handles = []
    for L, block in enumerate(layers):
        handles += [block.register_forward_hook(out_hook("resid_post", L)),
                    block.self_attn.o_proj.register_forward_pre_hook(in_hook("attn_out", L)),
                    block.pre_feedforward_layernorm.register_forward_hook(out_hook("mlp_in", L)),
                    block.post_feedforward_layernorm.register_forward_hook(out_hook("mlp_out", L))]
    kw = {"token_type_ids": (prompt.input_ids == SOFT).long()} if bidirectional else {}
    try:
        with torch.no_grad():
            hf(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values, **kw)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.stack([got[(s, L)][0] for L in range(len(layers))]) for s in LM_SITES}


def image_lens_setup(root, d_sae: int = 48, **size):
    """(folder of the tiny multimodal checkpoint, transformers model, picture file, {site:
    dictionary set loaded back from the Gemma Scope 2 layout}): SAEs at resid_post, attn_out
    and mlp_out and per-layer transcoders (mlp_in -> mlp_out) over all 4 layers, each
    calibrated on transformers' activations at :data:`IMAGE_PROMPT` with the picture (about
    15 % of latents fire at image and text positions). ``size``: the checkpoint's
    ``image_size`` / ``soft_tokens`` (default 56 pixels, 2 x 2 soft tokens)."""
    from cltrace.models.multimodal import load_multimodal
    from cltrace.transcoders import load_transcoders
    from cltrace.transcoders.write import save_gemmascope

    from .image_graphs import picture
    from .tiny_gemma_vision import save_tiny_gemma_vision
    from .transcoders import random_transcoders

    root = Path(root)
    folder = root / "model"
    hf = save_tiny_gemma_vision(folder, seed=1, **size)
    image = picture(root / "picture.png")
    lm = load_multimodal(folder, device="cpu", dtype=torch.float32)
    acts = hf_multimodal_sites(hf, lm.prompt(IMAGE_PROMPT, [str(image)]))
    sets = {}
    for seed, site in enumerate(("resid_post", "attn_out", "mlp_out")):
        ts = random_transcoders(mlp_in=acts[site], d_sae=d_sae, site=site, seed=20 + seed)
        sets[site] = load_transcoders(save_gemmascope(ts, root / f"{site}_all"), model_config=lm.model)
    ts = random_transcoders(mlp_in=acts["mlp_in"], d_sae=d_sae, seed=30)
    sets["transcoder"] = load_transcoders(save_gemmascope(ts, root / "transcoder_all"), model_config=lm.model)
    return folder, hf, image, sets
