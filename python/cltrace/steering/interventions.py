"""What an intervention is: set, scale or add to one transcoder feature at some positions.

An :class:`Intervention` names a feature ``(layer, feature)``, the positions it acts on and one
operation on its activation ``a``: ``set`` (a -> v), ``scale`` (a -> s * a) or ``add``
(a -> a + v). Interventions on the same feature and position compose in list order.
:class:`InterventionResult` is what :func:`cltrace.steering.modes.intervene` returns.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from ..ops import SparseActs
from ..errors import UsageError


Pos = Union[None, int, slice]


@dataclass(frozen=True)
class Intervention:
    """Set, scale or add to feature ``feature`` of the transcoder reading at ``layer``.

    ``pos``: None (every position with features), an int (negative counts from the end) or a
    slice of positions. Give exactly one of ``set``, ``scale``, ``add``."""

    layer: int
    feature: int
    pos: Pos = None
    set: Optional[float] = None
    scale: Optional[float] = None
    add: Optional[float] = None

    def __post_init__(self):
        for name in ("layer", "feature"):
            try:
                v = operator.index(getattr(self, name))
            except TypeError:
                raise UsageError(f"{name} must be an int, got {getattr(self, name)!r}") from None
            if v < 0:
                raise UsageError(f"{name} must be >= 0, got {v}")
            object.__setattr__(self, name, v)
        given = [k for k in ("set", "scale", "add") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UsageError("give exactly one of set=, scale=, add= per intervention"
                             + (f" (got {' and '.join(given)})" if given else " (got none)"))
        op = given[0]
        try:
            value = float(getattr(self, op))
        except (TypeError, ValueError):
            raise UsageError(f"{op} must be a number, got {getattr(self, op)!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"{op} must be a finite number, got {value}")
        object.__setattr__(self, op, value)
        if isinstance(self.pos, slice):
            for part in ("start", "stop", "step"):
                v = getattr(self.pos, part)
                if v is not None and not isinstance(v, int):
                    raise UsageError(f"pos slice {part} must be an int or None, got {v!r}")
            if self.pos.step is not None and self.pos.step <= 0:
                raise UsageError(f"pos slice step must be positive, got {self.pos.step}")
        elif self.pos is not None:
            try:
                object.__setattr__(self, "pos", operator.index(self.pos))
            except TypeError:
                raise UsageError(f"pos must be None, an int or a slice, got {self.pos!r}") from None

    @property
    def op(self) -> str:
        return "set" if self.set is not None else "scale" if self.scale is not None else "add"

    def apply(self, a: Tensor) -> Tensor:
        """The new activations from the old ones ``a [k]``."""
        if self.set is not None:
            return torch.full_like(a, self.set)
        if self.scale is not None:
            return a * self.scale
        return a + self.add

    def positions(self, n_pos: int, skip_positions: int = 0, device=None) -> Tensor:
        """The positions [k] (ascending, >= skip_positions) this acts on in a sequence of ``n_pos``."""
        if self.pos is None:
            idx = range(skip_positions, n_pos)
        elif isinstance(self.pos, slice):
            idx = [p for p in range(*self.pos.indices(n_pos)) if p >= skip_positions]
            if not idx:
                raise UsageError(f"pos {_fmt_pos(self.pos)} selects no position with features "
                                 f"(sequence of {n_pos} tokens, first {skip_positions} without features)")
        else:
            if not -n_pos <= self.pos < n_pos:
                raise UsageError(f"pos {self.pos} is out of range for a sequence of {n_pos} tokens")
            p = self.pos % n_pos
            if p < skip_positions:
                raise UsageError(f"pos {self.pos} lies in the first {skip_positions} positions, which have "
                                 f"no features (chat-template prefix)")
            idx = [p]
        return torch.tensor(list(idx), dtype=torch.int64, device=device)

    def __str__(self) -> str:
        where = "" if self.pos is None else f"@{_fmt_pos(self.pos)}"
        sym = {"set": "=", "scale": "*", "add": "+"}[self.op]
        return f"{self.layer}:{self.feature}{where}{sym}{getattr(self, self.op):g}"


def _fmt_pos(pos: Pos) -> str:
    if isinstance(pos, slice):
        return f"{'' if pos.start is None else pos.start}:{'' if pos.stop is None else pos.stop}" + \
            ("" if pos.step is None else f":{pos.step}")
    return str(pos)


def check_interventions(interventions: Sequence[Intervention], tcs, n_pos: int,
                        skip_positions: int) -> list[Intervention]:
    """Validate against a transcoder set and a sequence length; clear ValueErrors."""
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    out = list(interventions)
    for iv in out:
        if not isinstance(iv, Intervention):
            raise UsageError(f"interventions must be Intervention objects, got {type(iv).__name__}")
        if iv.layer >= tcs.n_layers:
            raise UsageError(f"layer {iv.layer} is out of range: the model has {tcs.n_layers} layers")
        if iv.layer not in tcs.layers:
            raise UsageError(f"layer {iv.layer} has no transcoder (layers with one: "
                             f"{sorted(tcs.layers)})")
        d_sae = tcs.layers[iv.layer].d_sae
        if iv.feature >= d_sae:
            raise UsageError(f"feature {iv.feature} is out of range: layer {iv.layer}'s "
                             f"transcoder has {d_sae} features")
        iv.positions(n_pos, skip_positions)  # raises for a bad position
    return out


@dataclass(repr=False)
class InterventionResult:
    """What the model does on a prompt under interventions."""

    mode: str  # "frozen" or "free"
    tokens: Tensor  # [n_pos] int64
    logits: Tensor  # [n_pos, vocab]  under the interventions
    clean_logits: Tensor  # [n_pos, vocab]  the real model's, without interventions
    acts: list[SparseActs]  # per layer, the features after interventions (pre_acts: encoder z)
    mlp_in: Tensor  # [n_layers, n_pos, d_model]  every layer's MLP input under the interventions
    resid_final: Tensor  # [n_pos, d_model]  the final norm's input under the interventions
    interventions: list[Intervention]

    def __repr__(self) -> str:
        d = (self.logits[-1].float() - self.clean_logits[-1].float()).abs().max().item()
        return (f"InterventionResult(mode={self.mode!r}, n_pos={self.tokens.numel()}, "
                f"interventions={len(self.interventions)}, max_last_logit_change={d:.3g})")

    def activation(self, layer: int, pos: int, feature: int) -> float:
        """A feature's activation after the interventions (0 when inactive)."""
        a = self.acts[layer]
        pos = pos % a.n_rows  # negative: from the end
        lo, hi = a.row_offsets[pos].item(), a.row_offsets[pos + 1].item()
        hit = (a.feat_idx[lo:hi] == feature).nonzero()
        return float(a.acts[lo + hit[0, 0]]) if hit.numel() else 0.0


def new_values(ivs: Sequence[Intervention], old_of: Callable[[int], Tensor], n_ref: int,
               skip_positions: int) -> dict[int, tuple[Tensor, Tensor]]:
    """Apply one layer's interventions in order: feature -> (old [n], new [n]) activations.
    Positions are resolved against a sequence of ``n_ref`` tokens."""
    out: dict[int, tuple[Tensor, Tensor]] = {}
    for iv in ivs:
        if iv.feature not in out:
            old = old_of(iv.feature)
            out[iv.feature] = (old, old.clone())
        old, new = out[iv.feature]
        pos = iv.positions(n_ref, skip_positions, device=new.device)
        new[pos] = iv.apply(new[pos])
    return out


def by_layer(interventions: Sequence[Intervention]) -> dict[int, list[Intervention]]:
    groups: dict[int, list[Intervention]] = {}
    for iv in interventions:
        groups.setdefault(iv.layer, []).append(iv)
    return groups
