"""What an evaluation measured: one :class:`LayerEval` per layer, the means, the terminal table
and the JSON record."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..settings import as_dict

# the per-layer fields, in table and JSON order
FIELDS = ("fvu", "l0", "l0_p10", "l0_p50", "l0_p90", "l0_max", "dead", "dense", "ce_splice",
          "ce_zero", "delta_ce", "loss_recovered")


@dataclass
class LayerEval:
    """The measurements of one layer (docs/method.md, "Evaluating a dictionary")."""

    layer: int
    fvu: float  # fraction of variance unexplained of the output site's reconstruction
    l0: float  # mean active features per token (features read at this layer)
    l0_p10: float  # percentiles of the active features per token
    l0_p50: float
    l0_p90: float
    l0_max: float
    dead: float  # fraction of the features that never fire on the evaluated tokens
    dense: float  # fraction firing on more than dense_threshold of them
    ce_splice: float  # next-token CE (nats/token), this layer's output site reconstructed
    ce_zero: float  # next-token CE, this layer's output site set to 0
    delta_ce: float  # ce_splice - clean CE
    loss_recovered: float  # (ce_zero - ce_splice) / (ce_zero - clean CE); NaN when they are equal


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _json_number(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN


@dataclass
class EvalReport:
    """An evaluation of a set on some tokens (:func:`cltrace.evaluation.evaluate_set`)."""

    layers: list[LayerEval]
    clean_ce: float  # next-token CE of the model itself, nats/token
    tokens: int  # evaluated positions (<bos> excluded)
    ce_tokens: int  # next-token predictions in the CE
    rows: int
    ctx: int
    settings: Any  # EvalSettings
    model_name: str = ""
    set_name: str = ""
    set_kind: str = ""  # "plt" or "clt" (a crosscoder is "clt")
    set_what: str = "transcoders"  # TranscoderSet.what: "transcoders", "CLT", "SAEs at resid_post", ...
    site_in: str = "mlp_in"  # the site the features read (cltrace.models.sites)
    site_out: str = "mlp_out"  # the site reconstructed, spliced and zero-ablated
    d_sae: int = 0
    skip: bool = False

    def mean(self) -> dict[str, float]:
        """Each field's mean over the layers (finite values only)."""
        return {f: _mean([getattr(e, f) for e in self.layers]) for f in FIELDS}

    def layer(self, L: int) -> LayerEval:
        return next(e for e in self.layers if e.layer == L)

    def to_json(self) -> dict:
        """Every number, the settings and the names (NaN written as null)."""
        return {
            "set": self.set_name, "set_kind": self.set_kind, "set_what": self.set_what,
            "site_in": self.site_in, "site_out": self.site_out, "d_sae": self.d_sae,
            "affine_skip": self.skip, "model": self.model_name, "tokens": self.tokens,
            "ce_tokens": self.ce_tokens, "rows": self.rows, "ctx": self.ctx,
            "settings": as_dict(self.settings), "clean_ce": _json_number(self.clean_ce),
            "layers": [{k: (_json_number(v) if isinstance(v, float) else v)
                        for k, v in dataclasses.asdict(e).items()} for e in self.layers],
            "mean": {k: _json_number(v) for k, v in self.mean().items()},
        }

    def table(self) -> str:
        """The terminal table: one row per layer, then the mean."""
        head = ("layer", "FVU", "L0", "p10", "p50", "p90", "max", "dead", "dense", "CE splice",
                "dCE", "CE zero", "recovered")

        def fmt(row: dict, name: str) -> list[str]:
            def num(x, spec):
                return "-" if not math.isfinite(x) else format(x, spec)
            return [name, num(row["fvu"], ".3f"), num(row["l0"], ".1f"), num(row["l0_p10"], ".0f"),
                    num(row["l0_p50"], ".0f"), num(row["l0_p90"], ".0f"), num(row["l0_max"], ".0f"),
                    num(row["dead"], ".1%"), num(row["dense"], ".1%"), num(row["ce_splice"], ".3f"),
                    num(row["delta_ce"], "+.3f"), num(row["ce_zero"], ".3f"),
                    num(row["loss_recovered"], ".1%")]

        body = [fmt(dataclasses.asdict(e), str(e.layer)) for e in self.layers]
        body.append(fmt(self.mean(), "mean"))
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *body]]
        rule = "-" * len(lines[0])
        return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])

    def summary(self) -> str:
        """One line: the set, the model, the tokens and the clean CE."""
        ce = f"{self.clean_ce:.3f}" if math.isfinite(self.clean_ce) else "-"
        return (f"set {self.set_name or 'transcoders'} ({self.set_what}, {self.d_sae} features"
                f"{', affine skip' if self.skip else ''}) on {self.model_name or 'the model'}: "
                f"{self.tokens} tokens ({self.rows} rows of {self.ctx}); clean CE {ce} nats/token "
                f"over {self.ce_tokens} predictions")
