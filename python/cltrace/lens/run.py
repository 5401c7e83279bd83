"""One forward pass recording the sites the sets read, then a JumpReLU encode per (set, layer)
and the top-k latents of every position.

The pass runs the decoder stack only up to the last layer any set reads (no later layer, no
unembedding): :func:`cltrace.models.sites.run_sites`. Each set's layer L is encoded from its
``site_in`` at L (``resid_post`` for crosscoders and resid_post SAEs, the ``heads x head_dim``
input of ``o_proj`` for attn_out SAEs, the MLP input for transcoders), exactly as
``acts = z * (z > threshold)``, ``z = x @ W_enc + b_enc`` (:func:`cltrace.ops.jumprelu_encode`).

``<bos>`` positions: Gemma Scope 2 dictionaries are trained without them (their activations
there are outliers), so by default they are listed, flagged ``bos``, and not encoded (no
latents); ``include_bos=True`` encodes them too.

Images (a multimodal Gemma 3, :func:`cltrace.models.multimodal.load_multimodal`): the pass
reads the prompt's embeddings with each image's soft tokens in place and attends both ways
among one image's soft tokens (``image_groups``), so every site at text and image positions is
the multimodal model's; soft tokens are labelled ``<img r,c>`` and each image gets its
:class:`~cltrace.lens.images.ImageMap` per (set, layer) (:mod:`cltrace.lens.images`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..errors import UsageError
from ..models.anatomy import text_parts
from ..models.sites import run_sites
from ..ops import jumprelu_encode
from ..settings import format_layers
from ..transcoders.base import TranscoderSet
from ..transcoders.checks import check_fits
from .images import LensImage, image_maps, lens_images
from .report import LensReport, LensSet


def lens_layers(ts: TranscoderSet, layers: Optional[Sequence[int]], name: str) -> list[int]:
    """The layers of ``ts`` the lens reads: ``layers`` (each must be one of the set's source
    layers) or all of them."""
    have = sorted(ts.layers)
    if layers is None:
        return have
    missing = sorted(set(int(L) for L in layers) - set(have))
    if missing:
        raise UsageError(f"--layers: {name} ({ts.what}) has no dictionary at layer(s) "
                         f"{format_layers(missing)} (it has {format_layers(have)})")
    return sorted(set(int(L) for L in layers))


def _tokens(tokenizer, text: Union[str, Tensor, Sequence[int]], chat: bool) -> Tensor:
    """Token ids ``[T]`` of ``text`` (a string, with ``<bos>``; or ids as given)."""
    if isinstance(text, str):
        if tokenizer is None:
            raise UsageError("a text needs a tokenizer: pass a LoadedModel or tokenizer=")
        if not text.strip():
            raise UsageError("the text is empty")
        from ..models.chat import prompt_tokens

        _, text = prompt_tokens(tokenizer, text, chat)
        if isinstance(text, str):
            text = tokenizer(text, return_tensors="pt")["input_ids"][0]
    ids = torch.as_tensor(text, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise UsageError("the text is empty (no tokens)")
    return ids


def _top_k(sp, n_rows: int, d_sae: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(index [N, k], activation [N, k], count [N]) of the ``k`` largest active latents of each
    row of the CSR ``sp`` (count: how many of the k are active; the rest are padding -1 / 0).
    Sorted within the CSR (nnz entries), never densified: [N, d_sae] is not made."""
    dev = sp.acts.device
    rows = sp.rows()  # [nnz]
    order = torch.argsort(sp.acts, descending=True, stable=True)  # by activation ...
    order = order[torch.argsort(rows[order], stable=True)]  # ... within each row
    rank = torch.arange(order.numel(), device=dev) - sp.row_offsets[rows[order]]  # place in its row
    k = min(k, d_sae)
    kept = rank < k
    keep = order[kept]
    idx = torch.full((n_rows, k), -1, dtype=torch.long, device=dev)
    act = sp.acts.new_zeros(n_rows, k)
    r, c = rows[keep], rank[kept]
    idx[r, c] = sp.feat_idx[keep]
    act[r, c] = sp.acts[keep]
    count = sp.row_offsets.diff().clamp_max(k)
    return idx.cpu(), act.float().cpu(), count.cpu()


@torch.no_grad()
def feature_lens(model, dictionaries: Union[TranscoderSet, Sequence[TranscoderSet]],
         text, *, top_k: int = 5,
         layers: Optional[Sequence[int]] = None, names: Optional[Sequence[str]] = None,
         tokenizer=None, chat: bool = False, include_bos: bool = False,
         bos_token_id: Optional[int] = None, model_name: str = "",
         images: Sequence = ()) -> LensReport:
    """The top ``top_k`` active latents of each set in ``dictionaries`` at each token of
    ``text`` (a string, tokenized with ``<bos>``, wrapped in the chat turn with ``chat``; or
    token ids ``[T]``) and each of the set's layers (``layers``: only those, which every set
    must have). ``model``: a :class:`cltrace.models.LoadedModel` (its tokenizer and name are
    used) or a Gemma 3 causal LM. ``names``: one name per set for the report (default: its
    set id or source). One forward pass (module doc); each set is checked against the model
    first (:func:`cltrace.transcoders.checks.check_fits`).

    ``images`` (files or RGB uint8 ``[3, H, W]`` tensors; ``model`` a
    :class:`cltrace.models.multimodal.LoadedMultimodal`): ``text`` holds one
    ``<start_of_image>`` per image, where it goes
    (:meth:`~cltrace.models.multimodal.LoadedMultimodal.prompt`); ``text`` may also be an already built
    :class:`~cltrace.models.multimodal.ImagePrompt`. The report's ``images`` then hold each
    image's maps (:mod:`cltrace.lens.images`)."""
    from ..models.multimodal import ImagePrompt

    multimodal = model if hasattr(model, "vision") and hasattr(model, "embed") else None
    if (images or isinstance(text, ImagePrompt)) and multimodal is None:
        raise UsageError("images need a multimodal Gemma 3 (cltrace.models.multimodal.load_multimodal)")
    if hasattr(model, "tokenizer") and hasattr(model, "model"):  # a LoadedModel / LoadedMultimodal
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model_name = model_name or getattr(model, "name", "")
        model = model.model
    if bos_token_id is None and tokenizer is not None:
        bos_token_id = getattr(tokenizer, "bos_token_id", None)
    sets = [dictionaries] if isinstance(dictionaries, TranscoderSet) else list(dictionaries)
    if not sets:
        raise UsageError("no dictionary set given")
    if int(top_k) < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    names = list(names) if names is not None else [
        str(ts.info.get("set_id", "") or ts.source or f"set {i}") for i, ts in enumerate(sets)]
    if len(names) != len(sets):
        raise ValueError(f"{len(names)} names for {len(sets)} sets")
    parts = text_parts(model)
    for ts, name in zip(sets, names):
        check_fits(ts, model, name)
    read = [lens_layers(ts, layers, name) for ts, name in zip(sets, names)]
    device = next(model.parameters()).device
    sites = {(ts.site_in, L) for ts, ls in zip(sets, read) for L in ls}

    pictures: list[LensImage] = []
    if multimodal is not None and (images or isinstance(text, ImagePrompt)):
        if isinstance(text, ImagePrompt):
            prompt, text = text, ""
        else:
            if not isinstance(text, str) or not text.strip():
                raise UsageError("the text is empty" if isinstance(text, str) else
                                 "images go with a text (a string), not token ids")
            prompt = multimodal.prompt(text, list(images), chat=chat)
        ids = prompt.input_ids[0].cpu()  # [T]
        rec = run_sites(parts, None, sites, inputs_embeds=multimodal.embed(prompt),
                        image_groups=prompt.image_groups)  # {(site, L): [1, T, width]}
        tokens = multimodal.token_labels(prompt)
        files = [_image_name(im, i) for i, im in enumerate(images)] if images else [
            f"image{g + 1}" for g in range(int(prompt.image_groups.max()) + 1)]
        pictures = lens_images(prompt.image_groups[0].cpu(), tokens, files)
    else:
        ids = _tokens(tokenizer, text, chat).cpu()
        rec = run_sites(parts, ids[None], sites)  # {(site, L): [1, T, width]}
        tokens = None

    bos = (ids == bos_token_id) if bos_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
    rows = torch.arange(ids.numel()) if include_bos else (~bos).nonzero()[:, 0]  # encoded positions
    out = []
    for s, (ts, name, ls) in enumerate(zip(sets, names, read)):
        per_layer = {}
        for L in ls:
            tc = ts.layers[L]
            x = rec[(ts.site_in, L)][0][rows.to(device)].to(device=tc.W_enc.device, dtype=tc.W_enc.dtype)  # [N, d_in]
            sp = jumprelu_encode(x.contiguous(), tc.W_enc, tc.b_enc, tc.threshold)
            per_layer[L] = _top_k(sp, rows.numel(), tc.d_sae, int(top_k))
            if pictures:
                shown = per_layer[L][0].flatten().unique()
                shown = shown[shown >= 0]  # the latents of the layer's cells
                for im in pictures:
                    im.per_layer[(s, L)] = image_maps(sp, rows, im, shown, int(top_k))
        out.append(LensSet(name=name, what=ts.what, site=ts.site_in, d_sae=ts.d_sae, layers=ls,
                           latents=per_layer))
    tokens = tokens if tokens is not None else _decode(tokenizer, ids)
    return LensReport(token_ids=ids.tolist(), tokens=tokens, bos=bos.tolist(),
                      positions=rows.tolist(), sets=out, top_k=int(top_k), model=model_name,
                      include_bos=include_bos, text=text if isinstance(text, str) else "",
                      images=pictures)


def _image_name(image, i: int) -> str:
    """The name of image ``i`` of the prompt: its file's name, or ``image{i+1}`` for a tensor."""
    from pathlib import Path

    return Path(image).name if isinstance(image, (str, Path)) or hasattr(image, "__fspath__") \
        else f"image{i + 1}"


def _decode(tokenizer, ids: Tensor) -> list[str]:
    """Each token's text (its id as text without a tokenizer)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]
