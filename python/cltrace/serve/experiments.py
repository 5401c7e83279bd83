"""Experiments run from the viewer: interventions on a graph's features, checked against its edges.

A request names a graph (its JSON file) and a list of interventions on feature nodes
``(layer, feature index, position)`` with one operation each (``set``, ``scale``, ``add``).
:meth:`Experiments.run` replays the graph's prompt — the token ids are read from the graph's
embedding nodes ``E_{token}_{pos}``, so no tokenizer is needed and the prompt is exactly the
one the graph was computed on — through the replacement model with and without the
interventions and returns:

* the next-token probabilities ``softmax(logits[-1])`` before and after, for the union of the
  top ``k`` tokens of both runs;
* the greedy continuations before and after (``rm.generate``, real model, free mode);
* for every logit node of the graph, the *measured* change of its logit direction value
  ``Δ(logit_t − mean(logits))`` at the last position and, in frozen mode with the other
  features held fixed (``freeze_features``), the change the graph's edges *predict*:

      Δ_pred(t) = Σ_s A[t, s] / a_s · Δa_s

  with ``A[t, s]`` the direct edge weight of the JSON link ``s → t`` (gradient × activation,
  so ``A[t, s] / a_s`` is the effect per unit of activation), ``a_s`` the clean activation and
  ``Δa_s`` the change the intervention made. In that mode the local replacement model is
  linear in the intervened activations and the two agree exactly (Ameisen et al. 2025,
  "Circuit Tracing", § interventions) — unless pruning removed a link from the JSON, which
  the result says (``pruned``: the sources whose link to ``t`` is absent).

A graph with images (``metadata.info.images``) is replayed with them: the copies of its images
beside the JSON, on a replacement model of a multimodal Gemma 3
(:meth:`~cltrace.replacement.ReplacementModel.from_multimodal`), so its soft tokens are the
ones the graph was computed on; the continuations are text after the image.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Optional

from ..steering import generate, intervene
from ..steering.inputs import state_input

OPS = ("set", "scale", "add")
MODES = ("frozen", "free")
MAX_NEW_TOKENS = 64


class RequestError(ValueError):
    """An intervention request the server refuses (HTTP 400, message shown on the page)."""


def prompt_tokens(graph: dict) -> list[int]:
    """Token ids of the graph's prompt, from its embedding nodes ``E_{token}_{pos}``."""
    by_pos = {}
    for n in graph.get("nodes", []):
        nid = str(n.get("node_id", ""))
        if nid.startswith("E_"):
            parts = nid.split("_")
            if len(parts) == 3:
                by_pos[int(parts[2])] = int(parts[1])
    if not by_pos or sorted(by_pos) != list(range(len(by_pos))):
        raise RequestError("the graph has no embedding node for every position: cannot "
                           "recover its prompt's token ids")
    return [by_pos[p] for p in range(len(by_pos))]


def image_files(entries, folder: Optional[Path], what: str = "graph") -> list[Path]:
    """The files of the image ``entries`` of a graph's ``metadata.info.images`` or a lens's
    ``images`` (``{"file": name, ...}``: names beside the JSON in ``folder``), checked: plain
    file names that exist; [] without entries."""
    if not entries:
        return []
    if folder is None or not isinstance(entries, list):
        raise RequestError(f"the {what}'s images cannot be found")
    files = []
    for i, e in enumerate(entries):
        name = e.get("file") if isinstance(e, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise RequestError(f"image {i + 1} of the {what}: {name!r} is not a file name")
        path = folder / name
        if not path.is_file():
            raise RequestError(f"image {i + 1} of the {what}: {name} is not beside its JSON")
        files.append(path)
    return files


def graph_images(graph: dict, folder: Optional[Path]) -> list[Path]:
    """The files of a graph's images (``metadata.info.images``), [] for a text graph."""
    return image_files(((graph.get("metadata") or {}).get("info") or {}).get("images"), folder)


def image_prompt(model, ids: list[int], files: list[Path], what: str = "graph"):
    """The ImagePrompt of token ids and image files on ``model`` (a replacement model or an
    SaeSteering of a multimodal Gemma 3: its ``images``)."""
    loaded = getattr(model, "images", None)
    if loaded is None:
        raise RequestError(f"the {what} has an image: start `cltrace serve` with the multimodal "
                           "--model it was computed with")
    try:
        return loaded.prompt_from_ids(ids, [str(p) for p in files])
    except ValueError as e:  # (UsageError included)
        raise RequestError(str(e)) from None


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise RequestError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _int(x: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise RequestError(f"{what} must be an integer, got {x!r}")
    if not lo <= x < hi:
        raise RequestError(f"{what} {x} is out of range [{lo}, {hi})")
    return x


class Experiments:
    """Runs interventions for the viewer on one loaded :class:`~cltrace.ReplacementModel`
    (calls are serialised: the model is shared by the server's threads)."""

    def __init__(self, rm, top_k: int = 10):
        self.rm = rm
        self.top_k = top_k
        self._lock = threading.Lock()
        self._clean: dict = {}  # (tokens, mode) -> clean InterventionResult; (tokens, n) -> Generation
        self._state: tuple = (None, None)  # (key, ReplacementState) of the last graph run

    def _cached(self, key, compute):
        if key not in self._clean:
            if len(self._clean) >= 16:
                self._clean.pop(next(iter(self._clean)))
            self._clean[key] = compute()
        return self._clean[key]

    # --- what the page needs to know -------------------------------------------------------
    def info(self) -> dict:
        tcs = self.rm.transcoders
        return {"available": True, "model": getattr(self.rm, "model_name", "") or "",
                "n_layers": int(tcs.n_layers),
                "d_sae": {str(L): int(tc.d_sae) for L, tc in sorted(tcs.layers.items())}}

    # --- validation --------------------------------------------------------------------------
    def parse(self, req: dict, n_pos: int) -> tuple[list, str, bool, int]:
        """Validated (interventions, mode, freeze_features, max_new_tokens) of a request."""
        from cltrace import Intervention

        if not isinstance(req, dict):
            raise RequestError("the request must be a JSON object")
        mode = req.get("mode", "frozen")
        if mode not in MODES:
            raise RequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        freeze = req.get("freeze_features", False)
        if not isinstance(freeze, bool):
            raise RequestError("freeze_features must be true or false")
        if freeze and mode != "frozen":
            raise RequestError("freeze_features needs mode 'frozen'")
        max_new = _int(req.get("max_new_tokens", 12), "max_new_tokens", 0, MAX_NEW_TOKENS + 1)
        items = req.get("interventions")
        if not isinstance(items, list) or not items:
            raise RequestError("select at least one feature to intervene on")
        tcs = self.rm.transcoders
        out = []
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise RequestError(f"intervention {i} must be an object")
            layer = _int(it.get("layer"), "layer", 0, tcs.n_layers)
            if layer not in tcs.layers:
                raise RequestError(f"layer {layer} has no transcoder")
            feature = _int(it.get("feature"), f"feature (layer {layer})", 0, tcs.layers[layer].d_sae)
            pos = _int(it.get("pos"), "position", 0, n_pos)
            op = it.get("op")
            if op not in OPS:
                raise RequestError(f"op must be one of {', '.join(OPS)}, got {op!r}")
            value = _number(it.get("value"), f"value of {op}")
            out.append(Intervention(layer, feature, pos=pos, **{op: value}))
        return out, mode, freeze, max_new

    # --- the experiment ----------------------------------------------------------------------
    def check_graph(self, graph: dict, tokens: list[int]) -> None:
        """The graph must come from a model of this shape: layers and vocabulary."""
        n_layers = int(self.rm.transcoders.n_layers)
        logit_layers = {int(n["layer"]) for n in graph["nodes"] if n.get("feature_type") == "logit"}
        if logit_layers and logit_layers != {n_layers + 1}:
            raise RequestError(f"the graph's logit nodes sit at layer {sorted(logit_layers)[0]}, so it was "
                               f"computed for a {sorted(logit_layers)[0] - 1}-layer model; the server's "
                               f"model has {n_layers} layers")
        vocab = self.rm.model.get_input_embeddings().num_embeddings
        if max(tokens) >= vocab:
            raise RequestError(f"the graph's token id {max(tokens)} is outside the server model's "
                               f"vocabulary of {vocab}: a graph of another model?")

    def prompt(self, graph: dict, tokens: list[int], folder: Optional[Path]):
        """What the model runs: the token ids, or with images an ImagePrompt of the ids and the
        images beside the graph."""
        images = graph_images(graph, folder)
        return image_prompt(self.rm, tokens, images) if images else tokens

    def run(self, graph: dict, req: dict, folder: Optional[Path] = None) -> dict:
        """Before/after probabilities, continuations and measured vs predicted logit changes
        (``folder``: the graph's, where its images are)."""
        tokens = prompt_tokens(graph)
        self.check_graph(graph, tokens)
        ivs, mode, freeze, max_new = self.parse(req, len(tokens))
        with self._lock:
            try:
                key = (tuple(tokens), tuple(graph_images(graph, folder)))
                if self._state[0] != key:  # the last graph's replacement state, reused
                    self._state = (key, self.rm.run(self.prompt(graph, tokens, folder)))
                state = self._state[1]
                res = intervene(self.rm, None, ivs, mode=mode, freeze_features=freeze, state=state)
                clean = self._cached(("run", key, mode),
                                     lambda: intervene(self.rm, None, [], mode=mode, state=state))
                gens = None
                if max_new:
                    start = state_input(state)  # (an image's soft tokens: computed once)
                    gens = (self._cached(("gen", key, max_new), lambda: generate(
                                self.rm, start, [], max_new_tokens=max_new, seed=0)),
                            generate(self.rm, start, ivs, max_new_tokens=max_new, seed=0))
            except ValueError as e:  # the library's own checks (positions without features ...)
                raise RequestError(str(e)) from None
        out = {"mode": mode, "freeze_features": freeze,
               "interventions": [str(iv) for iv in ivs],
               "top": self._top(res.clean_logits[-1], res.logits[-1]),
               "logits": self._logit_changes(graph, res, clean, ivs, predict=mode == "frozen" and freeze)}
        if gens is not None:
            out["continuation"] = {"before": self._text(gens[0]), "after": self._text(gens[1])}
        return out

    def _decode(self, tok: int) -> str:
        tz = getattr(self.rm, "tokenizer", None)
        return tz.decode([tok]) if tz is not None else f"#{tok}"

    def _text(self, gen) -> str:
        return gen.text if getattr(self.rm, "tokenizer", None) is not None else \
            " ".join(f"#{t}" for t in gen.new_tokens.tolist())

    def _top(self, before, after) -> list[dict]:
        """Union of the top-k next tokens before and after, with both probabilities."""
        import torch

        p0 = torch.softmax(before.double(), -1)
        p1 = torch.softmax(after.double(), -1)
        ids = []
        for p in (p0, p1):
            for t in p.topk(min(self.top_k, p.numel())).indices.tolist():
                if t not in ids:
                    ids.append(t)
        ids.sort(key=lambda t: -float(p0[t]))
        return [{"token": t, "text": self._decode(t), "before": float(p0[t]),
                 "after": float(p1[t])} for t in ids]

    def _logit_changes(self, graph, res, clean, ivs, predict: bool) -> list[dict]:
        """Per logit node: measured Δ of the centred logit; predicted Δ from the edges."""
        def centred(lg):
            v = lg[-1].double()
            return v - v.mean()

        d = centred(res.logits) - centred(res.clean_logits)
        incoming: dict[str, dict[str, float]] = {}
        logit_ids = [n["node_id"] for n in graph["nodes"] if n.get("feature_type") == "logit"]
        wanted = set(logit_ids)
        sources = {f"{iv.layer}_{iv.feature}_{iv.pos}": iv for iv in ivs}
        if predict:
            for link in graph.get("links", []):
                if link["target"] in wanted and link["source"] in sources:
                    incoming.setdefault(link["target"], {})[link["source"]] = float(link["weight"])
        out = []
        for nid in logit_ids:
            tok = int(nid.split("_")[1])
            row = {"node_id": nid, "token": tok, "text": self._decode(tok), "measured": float(d[tok])}
            if predict:
                pred, pruned = 0.0, []
                for sid, iv in sources.items():
                    a0 = clean.activation(iv.layer, iv.pos, iv.feature)
                    a1 = res.activation(iv.layer, iv.pos, iv.feature)
                    w = incoming.get(nid, {}).get(sid)
                    if a1 == a0:
                        continue
                    if w is None or a0 == 0.0:
                        pruned.append(sid)  # no link in the JSON (pruned, or inactive source)
                        continue
                    pred += w / a0 * (a1 - a0)
                row["predicted"] = pred
                row["pruned"] = pruned
            out.append(row)
        return out
