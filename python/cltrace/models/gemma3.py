"""cltrace's own Gemma 3 text model: the function transformers' ``Gemma3ForCausalLM`` computes,
with the same module names (so hooks, :func:`.anatomy.text_parts` and the callers work on
either), without importing transformers. The block (docs/gemma3.md)::

    x0    = embed(ids) * sqrt(d_model)                       (scale cast to the weight dtype)
    h     = x + post_attention_layernorm(attn(input_layernorm(x)))
    x'    = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
    attn  : q, k = rope(q_norm(q_proj a)), rope(k_norm(k_proj a)); GQA;
            softmax(q k^T / sqrt(query_pre_attn_scalar) + mask) v -> o_proj
            mask: causal, and on sliding layers only the last ``sliding_window`` keys
    mlp   : down_proj(gelu_tanh(gate_proj x) * up_proj x)
    RMSNorm(x) = (x * rsqrt(mean(x^2) + eps) * (1 + w)) in fp32, cast back
    logits = norm(x_n) @ embed^T (tied)

Attention runs through SDPA by default; ``set_attn_implementation("eager")`` computes it
explicitly and returns the pattern from ``self_attn`` (what :mod:`..frozen.capture` reads).
Masks, RoPE and the KV cache are in :mod:`.gemma3_parts`; reading checkpoints is
:mod:`.gemma3_load` (which imports this module, never the reverse); writing one is
:func:`save_gemma3`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemma3_config import Gemma3TextConfig
from .gemma3_parts import KVCache, Rope, apply_rope, attention_masks, repeat_kv


class Gemma3RMSNorm(nn.Module):
    """``(x * rsqrt(mean(x^2) + eps)) * (1 + w)`` in fp32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Gemma3TextScaledWordEmbedding(nn.Embedding):
    """Token embeddings times ``sqrt(d_model)`` (the scale rounded to fp32, then to the dtype)."""

    def __init__(self, vocab: int, dim: int, padding_idx: Optional[int], scale: float):
        super().__init__(vocab, dim, padding_idx, _weight=torch.empty(vocab, dim))
        self.scalar_embed_scale = scale

    def forward(self, ids: Tensor) -> Tensor:  # [B, T] -> [B, T, d_model]
        scale = torch.tensor(self.scalar_embed_scale, dtype=torch.float32, device=self.weight.device)
        return super().forward(ids) * scale.to(self.weight.dtype)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class Gemma3MLP(nn.Module):
    """GeGLU: ``down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Gemma3Attention(nn.Module):
    """GQA self-attention with QK-norm and RoPE; returns ``(out [B, T, d_model], pattern)``,
    the pattern ``[B, n_heads, T, T_kv]`` in eager mode and None with SDPA."""

    def __init__(self, cfg: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        self.config = cfg
        self.layer_idx = layer_idx
        self.layer_type = cfg.layer_types[layer_idx]
        self.is_sliding = self.layer_type == "sliding_attention"
        self.sliding_window = cfg.sliding_window if self.is_sliding else None
        self.head_dim = cfg.head_dim
        self.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.scaling = cfg.query_pre_attn_scalar ** -0.5
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(d, cfg.num_attention_heads * hd)
        self.k_proj = _linear(d, cfg.num_key_value_heads * hd)
        self.v_proj = _linear(d, cfg.num_key_value_heads * hd)
        self.o_proj = _linear(cfg.num_attention_heads * hd, d)
        self.q_norm = Gemma3RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Optional[Tensor],
                cache: Optional[KVCache] = None) -> tuple[Tensor, Optional[Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H_kv, T, hd]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H_kv, T, hd]
        q, k = apply_rope(self.q_norm(q), self.k_norm(k), *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, H_kv, T_kv, hd]
        if self.config._attn_implementation == "eager":
            out, pattern = self._eager(q, k, v, mask)
        else:
            out, pattern = self._sdpa(q, k, v, mask), None
        return self.o_proj(out.reshape(B, T, -1).contiguous()), pattern

    def _eager(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]):
        """Explicit attention; ``mask`` additive float [B, 1, T, T_kv]; pattern in q's dtype."""
        k = repeat_kv(k, self.num_key_value_groups)
        v = repeat_kv(v, self.num_key_value_groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, H, T, T_kv]
        if mask is not None:
            scores = scores + mask
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(pattern, v).transpose(1, 2).contiguous()  # [B, T, H, hd]
        return out, pattern

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """SDPA; ``mask`` boolean [B, 1, T, T_kv] (True: attend) or None for plain causal."""
        T = q.shape[2]
        kw = {}
        if self.num_key_value_groups > 1:
            if mask is None and k.shape[-1] <= 256:
                kw["enable_gqa"] = True
            else:
                k = repeat_kv(k, self.num_key_value_groups)
                v = repeat_kv(v, self.num_key_value_groups)
        is_causal = mask is None and T > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                             is_causal=is_causal, **kw)  # [B, H, T, hd]
        return out.transpose(1, 2).contiguous()  # [B, T, H, hd]


class Gemma3DecoderLayer(nn.Module):
    """One Gemma 3 block (module docstring); norms called positionally (hooks read args[0])."""

    def __init__(self, cfg: Gemma3TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention_type = cfg.layer_types[layer_idx]
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = Gemma3RMSNorm(d, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(d, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(d, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(d, eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Optional[Tensor],
                cache: Optional[KVCache] = None) -> Tensor:  # [B, T, d_model]
        a, _ = self.self_attn(self.input_layernorm(x), rope, mask, cache)
        h = x + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


@dataclass
class TextModelOutput:
    last_hidden_state: Tensor  # [B, T, d_model] after the final norm
    past_key_values: Optional[KVCache] = None


@dataclass
class CausalLMOutput:
    logits: Tensor  # [B, T (or logits_to_keep), vocab]
    past_key_values: Optional[KVCache] = None

    @property
    def cache(self) -> Optional[KVCache]:  # transformers 5's new name
        return self.past_key_values


class Gemma3TextModel(nn.Module):
    """Embedding, decoder stack and final norm: ``input_ids [B, T]`` -> hidden ``[B, T, d]``."""

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = Gemma3TextScaledWordEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                          cfg.pad_token_id, cfg.hidden_size ** 0.5)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = Gemma3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = Rope(cfg)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                cache: Optional[KVCache] = None, image_groups: Optional[Tensor] = None,
                **_ignored) -> TextModelOutput:
        """``attention_mask [B, T_past + T]`` (1: a real token, 0: padding), ``position_ids
        [B, T]`` (default: ``T_past + arange(T)``); with ``use_cache`` the keys and values are
        kept in ``past_key_values`` (a :class:`KVCache`, created when None). ``image_groups
        [B, T_past + T]``: which image each position's soft token belongs to (-1: text), for
        the bidirectional attention among one image's soft tokens (multimodal prompts, whose
        ``inputs_embeds`` carry the soft tokens: :mod:`.vision`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = KVCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(x.shape[1], device=x.device) + past)[None]
        masks = attention_masks(self.config, x, attention_mask, past, image_groups)
        ropes = {t: self.rotary_emb(x, position_ids, t) for t in set(self.config.layer_types)}
        for layer in self.layers:
            t = layer.attention_type
            x = layer(x, ropes[t], masks[t], cache)
        return TextModelOutput(self.norm(x), cache if use_cache or cache is not None else None)


class Gemma3ForCausalLM(nn.Module):
    """The causal LM: :class:`Gemma3TextModel` plus the (tied) unembedding ``lm_head``."""

    def __init__(self, cfg: Gemma3TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma3TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self.lm_head.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def name_or_path(self) -> str:
        return self.config.name_or_path

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def save_pretrained(self, folder) -> None:
        """``config.json`` + ``model.safetensors`` in ``folder`` (see :func:`save_gemma3`)."""
        save_gemma3(self, folder)

    def set_attn_implementation(self, name: str) -> None:
        """"sdpa" (default) or "eager" (self_attn also returns the attention pattern)."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attention implementation {name!r}: cltrace's Gemma 3 has 'sdpa' "
                             "and 'eager'")
        self.config._attn_implementation = name

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[KVCache] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                logits_to_keep: Union[int, Tensor] = 0, cache: Optional[KVCache] = None,
                image_groups: Optional[Tensor] = None, **_ignored) -> CausalLMOutput:
        """Logits ``[B, T, vocab]`` (the last ``logits_to_keep`` positions when > 0); the
        arguments as :meth:`Gemma3TextModel.forward`."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, cache=cache,
                         image_groups=image_groups)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return CausalLMOutput(logits, out.past_key_values)


def save_gemma3(model: Gemma3ForCausalLM, folder: Union[str, Path]) -> None:
    """Write ``config.json`` (transformers 5 layout) and ``model.safetensors`` (the tied
    unembedding once, as ``save_pretrained`` does): readable by
    :func:`.gemma3_load.load_gemma3` and by transformers. Needs safetensors only."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    for k in ("name_or_path", "_attn_implementation"):
        cfg.pop(k, None)
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
