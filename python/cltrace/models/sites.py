"""Sites: the activations of a Gemma 3 layer that a dictionary reads or writes.

A dictionary (SAE, transcoder, CLT, crosscoder) is described by the site it reads, the site it
writes and its layers. Gemma Scope 2 names each site by a transformers hook point (the
``hf_hook_point_in``/``hf_hook_point_out`` of its config.json):

============  =====================================================  ======================
site          hook point (layer L)                                   width
============  =====================================================  ======================
resid_post    ``model.layers.{L}.output`` (the block's output)       hidden_size
attn_out      ``model.layers.{L}.self_attn.o_proj.input`` (the       heads x head_dim
              heads' concatenated outputs, before ``o_proj``)
mlp_in        ``model.layers.{L}.pre_feedforward_layernorm.output``   hidden_size
mlp_out       ``model.layers.{L}.post_feedforward_layernorm.output``  hidden_size
============  =====================================================  ======================

A transcoder reads ``mlp_in`` and writes ``mlp_out``; an SAE reads and writes one site.
:func:`site_hooks` records the activation at sites during a forward pass, or replaces it;
:func:`run_sites` runs the decoder stack only as far as the last site it records (on token ids,
or on an image + text prompt's embeddings with its bidirectional image mask).
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Mapping, Optional

from torch import Tensor

from .anatomy import TextParts, module_output

SITES = {
    "resid_post": "model.layers.{L}.output",
    "attn_out": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}
SAE_SITES = ("resid_post", "attn_out", "mlp_out")  # the sites of Gemma Scope 2's SAEs
# Gemma Scope 2 folder names -> (site in, site out) when a folder has no config.json
FOLDER_SITES = {"resid_post_all": ("resid_post", "resid_post"), "resid_post": ("resid_post", "resid_post"),
                "attn_out_all": ("attn_out", "attn_out"), "attn_out": ("attn_out", "attn_out"),
                "mlp_out_all": ("mlp_out", "mlp_out"), "mlp_out": ("mlp_out", "mlp_out"),
                "crosscoder": ("resid_post", "resid_post"),
                "transcoder_all": ("mlp_in", "mlp_out"), "transcoder": ("mlp_in", "mlp_out"),
                "clt": ("mlp_in", "mlp_out")}
_PATTERNS = {site: re.compile(re.escape(t).replace(re.escape("{L}"), r"(\d+|\{L\}|\*)"))
             for site, t in SITES.items()}

Site = tuple[str, int]  # (site name, layer)
FORWARD_ORDER = {"attn_out": 0, "mlp_in": 1, "mlp_out": 2, "resid_post": 3}  # within a layer


def hook_point(site: str, layer) -> str:
    """The hook point of ``site`` at ``layer`` (an int, or "{L}" for a template)."""
    return SITES[check_site(site)].format(L=layer)


def check_site(site: str) -> str:
    """``site`` if it is a known site name, else a ValueError listing them."""
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}")
    return site


def parse_hook(hook: str) -> Optional[tuple[str, Optional[int]]]:
    """``"model.layers.5.output"`` -> ("resid_post", 5); a template layer ("{L}", "*") gives
    None as layer; a hook point that is no site gives None."""
    for site, pattern in _PATTERNS.items():
        m = pattern.fullmatch(hook or "")
        if m:
            return site, int(m.group(1)) if m.group(1).isdigit() else None
    return None


def site_width(config, site: str) -> int:
    """The width of ``site``'s activation for a Gemma 3 text config."""
    if check_site(site) == "attn_out":
        return int(config.num_attention_heads) * int(config.head_dim)
    return int(config.hidden_size)


def _module(parts: TextParts, site: str, layer: int):
    """(module, "output" | "input"): where the hook of ``site`` at ``layer`` sits."""
    block = parts.layers[layer]
    return {"resid_post": (block, "output"), "attn_out": (block.self_attn.o_proj, "input"),
            "mlp_in": (block.pre_feedforward_layernorm, "output"),
            "mlp_out": (block.post_feedforward_layernorm, "output")}[check_site(site)]


def _replace_first(x, new: Tensor):
    """``x`` (a tensor, or a tuple whose first element is the activation) with ``new`` in place
    of the activation."""
    if isinstance(x, (tuple, list)):
        return type(x)((new, *x[1:]))
    return new


@contextlib.contextmanager
def site_hooks(parts: TextParts, record: Iterable[Site] = (),
               edit: Optional[Mapping[Site, Callable[[Tensor], Tensor]]] = None
               ) -> Iterator[dict[Site, Tensor]]:
    """Hooks on ``parts``' layers for the passes run inside the block.

    record: sites whose activation ``[B, T, width]`` is stored (detached) in the yielded dict.
    edit: site -> function of the activation returning the activation that replaces it (the
        function may return its argument edited in place). A site both recorded and edited is
        recorded before the edit.
    """
    rec: dict[Site, Tensor] = {}
    wanted = {tuple(s) for s in record}
    edits = dict(edit or {})
    handles = []

    def on(site: Site):
        keep, fn = site in wanted, edits.get(site)

        def visit(x):
            a = module_output(x)
            if keep:
                rec[site] = a.detach()
            return None if fn is None else _replace_first(x, fn(a))
        return visit

    try:
        for site in sorted(wanted | set(edits)):
            module, where = _module(parts, *site)
            visit = on(site)
            if where == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, v=visit: v(args)))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, v=visit: v(out)))
        yield rec
    finally:
        for h in handles:
            h.remove()


class _Stop(Exception):
    """Raised by the hook of the last site :func:`run_sites` needs: the rest is not run."""


def last_site(sites: Iterable[Site]) -> Site:
    """The site of ``sites`` a forward pass reaches last."""
    return max(sites, key=lambda s: (s[1], FORWARD_ORDER[s[0]]))


def run_sites(parts: TextParts, ids: Optional[Tensor], sites: Iterable[Site], *,
              inputs_embeds: Optional[Tensor] = None,
              image_groups: Optional[Tensor] = None) -> dict[Site, Tensor]:
    """The activations ``{site: [B, T, width]}`` (detached) of ``sites`` on the token ids
    ``ids [B, T]`` (moved to the model's device): the decoder stack runs only as far as the
    last of them (no later layer, no unembedding).

    An image + text prompt (:class:`cltrace.models.multimodal.ImagePrompt`) gives instead
    ``inputs_embeds [B, T, d_model]`` (its embeddings with the soft tokens in place,
    :meth:`~cltrace.models.multimodal.LoadedMultimodal.embed`; ``ids`` is then None) and
    ``image_groups [B, T]`` (image of each soft-token position, -1 elsewhere): the image's
    soft tokens attend to each other both ways, as in the multimodal model. Only cltrace's
    own Gemma 3 (:mod:`.gemma3`) takes ``image_groups``; another model is a ValueError."""
    if (ids is None) == (inputs_embeds is None):
        raise ValueError("run_sites: give exactly one of ids or inputs_embeds")
    sites = sorted(set(sites))
    stop_at = last_site(sites)
    device = parts.lm_head.weight.device
    if inputs_embeds is None:
        kw = {"input_ids": ids.to(device)}
    else:
        kw = {"inputs_embeds": inputs_embeds.to(device)}
    if image_groups is not None and bool((image_groups >= 0).any()):
        from .gemma3 import Gemma3TextModel

        if not isinstance(parts.body, Gemma3TextModel):
            raise ValueError(f"run_sites: image_groups need cltrace's Gemma 3 (load_multimodal), "
                             f"not {type(parts.body).__name__}, which would attend causally")
        kw["image_groups"] = image_groups.to(device)

    def stop(_a: Tensor) -> Tensor:  # called after the site is recorded
        raise _Stop

    with site_hooks(parts, record=sites, edit={stop_at: stop}) as rec:
        try:
            parts.body(use_cache=False, **kw)
        except _Stop:
            pass
    return rec
