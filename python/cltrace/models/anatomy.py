"""The anatomy of a Gemma 3 causal LM: the modules the replacement model reads (no copies)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def module_output(x):
    """A module's main tensor: the first element of a tuple/list output (or of hook args)."""
    return x[0] if isinstance(x, (tuple, list)) else x


@dataclass
class TextParts:
    """The pieces of a Gemma 3 causal LM the replacement model reads (no copies)."""

    model: nn.Module  # the whole model (called for the forward pass)
    layers: nn.ModuleList  # Gemma3DecoderLayer x n_layers
    embed: nn.Module  # Gemma3TextScaledWordEmbedding (multiplies by sqrt(d_model))
    norm: nn.Module  # final RMSNorm
    lm_head: nn.Module  # unembedding (tied to the embedding in Gemma 3)
    config: object  # Gemma3TextConfig (cltrace's dataclass or transformers')
    body: nn.Module  # the decoder stack with the final norm, no unembedding (Gemma3TextModel)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size


def text_parts(model: nn.Module) -> TextParts:
    """Find the decoder stack of a Gemma3ForCausalLM (cltrace's own, :mod:`.gemma3`, or
    transformers') or a transformers Gemma3ForConditionalGeneration."""
    inner = getattr(model, "model", None)
    text = getattr(inner, "language_model", inner)  # multimodal wrapper holds the text model
    lm_head = getattr(model, "lm_head", None)
    if text is None or not hasattr(text, "layers") or lm_head is None:
        raise TypeError(f"expected a transformers Gemma 3 causal LM (Gemma3ForCausalLM or "
                        f"Gemma3ForConditionalGeneration), got {type(model).__name__}")
    config = getattr(text, "config", None)
    config = model.config if config is None else config
    config = getattr(config, "text_config", config)
    layer = text.layers[0]
    for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn", "mlp"):
        if not hasattr(layer, name):
            raise TypeError(f"{type(layer).__name__} has no `{name}`: not a Gemma 3 decoder layer")
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise ValueError("final logit softcapping is set: the logits would not be linear in the "
                         "residual stream (Gemma 3 has none; is this a Gemma 2 model?)")
    return TextParts(model, text.layers, text.embed_tokens, text.norm, lm_head, config, text)
