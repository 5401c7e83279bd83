"""Steering from the lens page: add to or clamp one SAE latent and replay the lens's prompt.

A request names a lens JSON (``cltrace lens --json``), one of its sets, a layer and a latent,
an operation (``add``: ``a_i + v``, ``set``: ``a_i = v``), the positions it acts on and a
number of tokens to generate::

    {"lens": path, "set": name, "layer": L, "latent": i, "op": "add"|"set", "value": v,
     "positions": "all"|"from"|"prompt", "pos": p, "max_new_tokens": n}

``positions``: ``all`` every position of the prompt and of the generated text, ``from`` the
clicked token ``pos`` onward (generated text included), ``prompt`` the prompt's positions
only. The prompt is the lens's own token ids (``tokens[].id``), so no tokenizer is needed; a
lens of an image prompt (its ``images``) is replayed with the copies of its images beside the
JSON, on a multimodal model (the soft tokens the lens read).
:meth:`LensSteering.run` runs it through :class:`~cltrace.steering.SaeSteering` of the loaded
SAE set that the lens's set names (by set id, source or the reference given to ``--sae``;
same site) and answers the next-token probabilities (union of the top ``k`` before and after)
and the greedy continuations ``generate(steerer, ids, [], n)`` and
``generate(steerer, ids, [iv], n, steer_generated=positions != "prompt")``.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

from ..steering import Intervention, generate
from ..steering.inputs import model_input
from .experiments import MAX_NEW_TOKENS, RequestError, _int, _number, image_files, image_prompt

POSITIONS = ("all", "from", "prompt")


def _keys(*names: Optional[str]) -> set[str]:
    """The names a set answers to: each as given and, when it names a folder, its real path."""
    out = set()
    for n in names:
        if not n:
            continue
        out.add(str(n))
        try:
            p = Path(n).expanduser()
            if p.exists():
                out.add(str(p.resolve()))
        except (OSError, ValueError):
            pass
    return out


class LensSteering:
    """Steers loaded SAE sets for the lens page (calls serialised: the model is shared)."""

    def __init__(self, steerers: Sequence, refs: Optional[Sequence[str]] = None, top_k: int = 10):
        """``steerers``: :class:`~cltrace.steering.SaeSteering` objects (one per ``--sae``);
        ``refs``: the reference each was loaded from, as typed (also matched)."""
        self.steerers = list(steerers)
        refs = list(refs) if refs is not None else [""] * len(self.steerers)
        if len(refs) != len(self.steerers):
            raise ValueError(f"{len(refs)} refs for {len(self.steerers)} SAE sets")
        self.refs = refs
        self.keys = [_keys(r, st.transcoders.source, str(st.transcoders.info.get("set_id", "")))
                     for st, r in zip(self.steerers, refs)]
        self.top_k = top_k
        self._lock = threading.Lock()

    def info(self) -> dict:
        """What the page shows: the loaded sets (name, site, layers) and the model."""
        return {"available": True,
                "model": self.steerers[0].model_name if self.steerers else "",
                "sets": [{"name": self._name(i), "site": st.site,
                          "layers": sorted(st.transcoders.layers)}
                         for i, st in enumerate(self.steerers)]}

    def _name(self, i: int) -> str:
        ts = self.steerers[i].transcoders
        return self.refs[i] or str(ts.info.get("set_id", "")) or ts.source or f"set {i}"

    def find(self, lens: dict, name: str):
        """(lens set entry, steerer) for the lens's set ``name`` (400 naming the ``--sae`` to
        start serve with when no loaded set matches)."""
        sets = lens.get("sets") or []
        idx = [s for s, e in enumerate(sets) if isinstance(e, dict) and e.get("name") == name]
        if not idx:
            raise RequestError(f"the lens has no set named {name!r}")
        s, entry = idx[0], sets[idx[0]]
        sources = lens.get("sources") or []
        ref = sources[s] if s < len(sources) and isinstance(sources[s], str) else name
        want = _keys(name, ref)
        for i, keys in enumerate(self.keys):
            if keys & want:
                st = self.steerers[i]
                if entry.get("site") != st.site:
                    raise RequestError(f"the lens's set {name!r} reads {entry.get('site')}, the "
                                       f"loaded --sae {self._name(i)} steers at {st.site}")
                return entry, st
        loaded = ", ".join(self._name(i) for i in range(len(self.steerers))) or "none"
        raise RequestError(f"the lens's set {name!r} is not loaded (loaded: {loaded}): start "
                           f"`cltrace serve DIR --sae {ref}` to steer with it")

    def parse(self, req: dict, lens: dict, steerer, entry: dict) -> tuple[Intervention, bool, int]:
        """(intervention, steer_generated, max_new_tokens) of a validated request."""
        n_tok = len(lens.get("tokens") or [])
        layer = req.get("layer")
        if layer not in entry.get("layers", []) or layer not in steerer.transcoders.layers:
            raise RequestError(f"layer {layer!r}: the set {entry.get('name')!r} has no SAE there "
                               f"(layers {entry.get('layers')})")
        latent = _int(req.get("latent"), "latent", 0, steerer.transcoders.layers[layer].d_sae)
        op = req.get("op")
        if op not in ("add", "set"):
            raise RequestError(f"op must be 'add' or 'set', got {op!r}")
        value = _number(req.get("value"), "value")
        where = req.get("positions", "all")
        if where not in POSITIONS:
            raise RequestError(f"positions must be one of {', '.join(POSITIONS)}, got {where!r}")
        pos = None
        if where == "from":
            pos = slice(_int(req.get("pos"), "pos", 0, n_tok), None)
        max_new = _int(req.get("max_new_tokens", 20), "max_new_tokens", 0, MAX_NEW_TOKENS + 1)
        return Intervention(layer, latent, pos=pos, **{op: value}), where != "prompt", max_new

    def run(self, lens: dict, req: dict, folder: Optional[Path] = None) -> dict:
        """Next-token probabilities and greedy continuations before and after (module doc);
        ``folder``: the lens's, where the copies of its images are."""
        if not isinstance(req, dict):
            raise RequestError("the request must be a JSON object")
        name = req.get("set")
        if not isinstance(name, str):
            raise RequestError("name the lens's set: {\"set\": \"...\", ...}")
        entry, st = self.find(lens, name)
        try:
            ids = [int(t["id"]) for t in lens.get("tokens") or []]
        except (KeyError, TypeError, ValueError):
            raise RequestError("the lens JSON has no token id for every position") from None
        if not ids:
            raise RequestError("the lens JSON has no tokens")
        iv, steer_generated, max_new = self.parse(req, lens, st, entry)
        files = image_files(lens.get("images"), folder, "lens")
        with self._lock:
            try:
                start = model_input(st, image_prompt(st, ids, files, "lens") if files else ids)
                ivs = st.check([iv], start.tokens)
                clean, steered = st.logits(start)[-1], st.logits(start, ivs)[-1]
                before = generate(st, start, [], max_new_tokens=max_new, seed=0)
                after = generate(st, start, ivs, max_new_tokens=max_new, seed=0,
                                 steer_generated=steer_generated)
            except ValueError as e:  # the library's checks (UsageError): out of vocabulary ...
                raise RequestError(str(e)) from None
        return {"set": name, "site": st.site, "intervention": str(ivs[0]),
                "positions": req.get("positions", "all"), "steer_generated": steer_generated,
                "top": self._top(st, clean, steered),
                "continuation": {"before": self._text(st, before), "after": self._text(st, after)},
                "tokens": {"before": before.new_tokens.tolist(), "after": after.new_tokens.tolist()}}

    def _top(self, st, before, after) -> list[dict]:
        """Union of the top-k next tokens before and after, with both probabilities."""
        import torch

        p0, p1 = torch.softmax(before.double(), -1), torch.softmax(after.double(), -1)
        ids: list[int] = []
        for p in (p0, p1):
            for t in p.topk(min(self.top_k, p.numel())).indices.tolist():
                if t not in ids:
                    ids.append(t)
        ids.sort(key=lambda t: -float(p0[t]))
        dec = (lambda t: st.tokenizer.decode([t])) if st.tokenizer is not None else (lambda t: f"#{t}")
        return [{"token": t, "text": dec(t), "before": float(p0[t]), "after": float(p1[t])} for t in ids]

    @staticmethod
    def _text(st, gen) -> str:
        return gen.text if st.tokenizer is not None else " ".join(f"#{t}" for t in gen.new_tokens.tolist())
