"""The Gemma 3 text configuration, read from a checkpoint's ``config.json`` without transformers.

Accepts the layouts a Gemma 3 ``config.json`` comes in:

* transformers 5 (``model_type: gemma3_text``): ``layer_types`` and ``rope_parameters`` keyed by
  layer type, ``{"full_attention": {"rope_type", "rope_theta", ...}, "sliding_attention": ...}``;
* older hub configs (google/gemma-3-1b-pt style): ``rope_theta`` (global layers),
  ``rope_local_base_freq`` (sliding layers), ``rope_scaling`` (global layers only, e.g.
  ``{"rope_type": "linear", "factor": 8.0}`` on 4B+) and ``sliding_window_pattern`` (every
  n-th layer is global) instead of ``layer_types``;
* multimodal ``model_type: gemma3`` checkpoints: the ``text_config`` inside (often sparse: the
  missing keys take transformers' ``Gemma3TextConfig`` defaults, which are the defaults here).

The defaults and the derivations (``layer_types`` from the pattern, the rope parameters per layer
type) are those of transformers 5's ``Gemma3TextConfig`` so that the model computes the same
function. Anything this implementation does not compute raises a one-line ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

GEMMA3_TYPES = ("gemma3_text", "gemma3")  # text-only and multimodal model_type
ROPE_TYPES = ("default", "linear")  # rope types computed here
_LAYER_TYPES = ("sliding_attention", "full_attention")
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


@dataclass
class Gemma3TextConfig:
    """Hyper-parameters of a Gemma 3 text model (names as in transformers' config)."""

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = 0
    eos_token_id: Any = 1
    bos_token_id: Optional[int] = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    layer_types: list = field(default_factory=list)  # "sliding_attention" | "full_attention"
    # per layer type: {"rope_type": "default"|"linear", "rope_theta": float, ["factor": float]}
    rope_parameters: dict = field(default_factory=dict)
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    use_bidirectional_attention: bool = False
    model_type: str = "gemma3_text"
    name_or_path: str = ""  # the folder or hub id the model came from
    _attn_implementation: str = "sdpa"  # "sdpa" or "eager" (eager returns the patterns)

    @property
    def _name_or_path(self) -> str:  # transformers' spelling
        return self.name_or_path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_config(folder: Union[str, Path], where: Optional[str] = None) -> Gemma3TextConfig:
    """The text config of the checkpoint in ``folder`` (its ``config.json``)."""
    folder = Path(folder)
    where = where or str(folder)
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OSError(f"cannot load a model config from {where}: {e}") from e
    return config_from_dict(raw, where)


def config_from_dict(raw: dict, where: str) -> Gemma3TextConfig:
    """A :class:`Gemma3TextConfig` from a ``config.json`` dict (any layout in the docstring)."""
    mt = raw.get("model_type")
    check_gemma3(mt, where)
    if mt == "gemma3":
        raw = dict(raw.get("text_config") or {})
        raw.setdefault("model_type", "gemma3_text")
    names = {f.name for f in dataclasses.fields(Gemma3TextConfig)} - {
        "layer_types", "rope_parameters", "_attn_implementation", "name_or_path"}
    kw = {k: raw[k] for k in names if k in raw}
    if "hidden_activation" not in raw and raw.get("hidden_act"):
        kw["hidden_activation"] = raw["hidden_act"]
    cfg = Gemma3TextConfig(**kw)
    if cfg.head_dim is None:
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    cfg.layer_types = _layer_types(raw, cfg.num_hidden_layers, where)
    cfg.rope_parameters = _rope_parameters(raw, where)
    _check_supported(cfg, where)
    return cfg


def check_gemma3(model_type: Optional[str], where: str) -> None:
    """One-line ValueError unless ``model_type`` is a Gemma 3 type."""
    if model_type not in GEMMA3_TYPES:
        raise ValueError(f"{where} is a {model_type!r} model, not Gemma 3 (cltrace supports Gemma 3 "
                         f"text models, model_type {' or '.join(GEMMA3_TYPES)})")


def _layer_types(raw: dict, n_layers: int, where: str) -> list:
    types = raw.get("layer_types")
    if types is None:  # older configs: every `pattern`-th layer is global
        pattern = raw.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(n_layers)]
    types = list(types)
    if len(types) != n_layers or any(t not in _LAYER_TYPES for t in types):
        raise ValueError(f"{where}: layer_types must list {n_layers} entries of {_LAYER_TYPES}")
    return types


def _rope_parameters(raw: dict, where: str) -> dict:
    """Per layer type ``{"rope_type", "rope_theta", ["factor"]}`` (transformers 5's rules:
    ``rope_scaling`` updates the global layers; missing thetas take ``rope_theta`` /
    ``rope_local_base_freq`` or the Gemma 3 defaults)."""
    given = raw.get("rope_parameters")
    if given and not set(given) <= set(_LAYER_TYPES):
        raise ValueError(f"{where}: rope_parameters {sorted(given)} are not keyed by layer type "
                         f"{_LAYER_TYPES} (not a Gemma 3 config?)")
    out = {t: dict((given or {}).get(t) or {"rope_type": "default"}) for t in _LAYER_TYPES}
    if raw.get("rope_scaling"):
        out["full_attention"].update(raw["rope_scaling"])
    full, local = out["full_attention"], out["sliding_attention"]
    full.setdefault("rope_theta", raw.get("rope_theta", _DEFAULT_THETA["full_attention"]))
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", _DEFAULT_THETA["sliding_attention"]))
    for t, p in out.items():
        if "type" in p and "rope_type" not in p:  # very old spelling
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
        if p["rope_type"] not in ROPE_TYPES:
            raise ValueError(f"{where}: rope_type {p['rope_type']!r} ({t}) is not supported "
                             f"(cltrace computes {' and '.join(ROPE_TYPES)} RoPE)")
        if p["rope_type"] == "linear" and "factor" not in p:
            raise ValueError(f"{where}: linear rope scaling ({t}) without a factor")
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor is not supported")
    return out


def _check_supported(cfg: Gemma3TextConfig, where: str) -> None:
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: hidden_activation {cfg.hidden_activation!r} is not supported "
                         "(Gemma 3 uses gelu_pytorch_tanh)")
    if cfg.use_bidirectional_attention:
        raise ValueError(f"{where}: use_bidirectional_attention is set (an embedding model): "
                         "cltrace supports causal Gemma 3 language models")
    if cfg.attn_logit_softcapping is not None:
        raise ValueError(f"{where}: attn_logit_softcapping is set (Gemma 3 has none; Gemma 2?)")
    if cfg.attention_bias:
        raise ValueError(f"{where}: attention biases are not supported (Gemma 3 has none)")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a "
                         f"multiple of num_key_value_heads {cfg.num_key_value_heads}")
