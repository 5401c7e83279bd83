"""The frozen linear model of one prompt: its forward and its hand-written linearised backward.

With the attention patterns and normalisation denominators frozen at their values on the
prompt (Ameisen et al. 2025, https://transformer-circuits.pub/2025/attribution-graphs/methods.html
§ "Building the local replacement model"), the map from the token embeddings ``e`` and the
*sources* written into each layer's MLP output ``s_L`` (transcoder feature decodes, ``b_dec``
and error vectors: constants of the linearisation) to the residual stream and the logits is
linear. Per layer L, with frozen norms ``k_*(y) = (y * scale_*) * (1 + w_*)`` (scale [n_pos]):

    r_0   = e
    v     = k_in(r_L) @ W_V^T                    # [n_pos, n_kv * head_dim]
    z_h   = P_h @ v_{kv(h)}                      # frozen pattern P_h [n_pos, n_pos], GQA
    h_L   = r_L + k_attn(z @ W_O^T)
    x_L   = k_pre(h_L)                           # the MLP input (what transcoders read)
    m_L   = s_L + x_L @ W_skip_L                 # affine skip of a transcoder, if any
    r_L+1 = h_L + m_L
    logits = k_final(r_n) @ W_U^T

:meth:`FrozenLinearModel.iter_backward_live` is the vector-Jacobian product of that map for a
batch of B seeds at once (no autograd, no replicated forward): a seed is a direction at one
position, either at the final-norm input (a logit direction, through the frozen final norm) or
at a layer's MLP input (a feature's encoder column, through the frozen pre-FF norm). Going down,
it yields for every layer L the gradient w.r.t. ``m_L`` and finally the gradient w.r.t. the
token embeddings. Seeds are sorted by layer, so that at layer L only the seeds above it are
carried (a prefix of the batch) and only positions up to the last seed's (causal); seed-major
``[k, n, d_model]``, the live seeds a prefix, so that every product is one GEMM on a contiguous
block. Memory is O(B * n_pos * d_model) per step. Leading positions without
nodes (``<bos>``, a chat prefix: s of them) need not be carried (:meth:`prefix_paths`). A seed
at (layer ℓ, position p) costs (ℓ + 1)·(p + 1 - s) per-position steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from .capture import Capture
from ..models.anatomy import TextParts
from .attention import Pattern, mix, mix_t

EMBED = -1  # the `layer` of the last backward step: the gradient w.r.t. the token embeddings


class Seeds(NamedTuple):
    """B gradient seeds. ``layer[b] == n_layers`` means the final-norm input (a logit seed)."""

    layer: Tensor  # [B] int64  layer whose MLP input x_L receives the seed, or n_layers
    pos: Tensor  # [B] int64  position of the seed
    vec: Tensor  # [B, d_model]  direction after the norm (encoder column / logit direction)

    @property
    def n(self) -> int:
        return self.layer.numel()


class LayerGrad(NamedTuple):
    """One step of the backward: layer L and d(seeds)/d(m_L), or EMBED and d(seeds)/d(e)."""

    layer: int
    grad: Tensor  # [k, n - start, d_model]: the live seeds at positions start .. n-1
    start: int = 0  # the position of grad's first row
    prefix: Optional[Tensor] = None  # EMBED with a prefix: [B, start] direct effects of the prefix tokens


class FrozenOutput(NamedTuple):
    logits: Tensor  # [n_pos, vocab]
    resid_final: Tensor  # [n_pos, d_model]  input of the final norm
    mlp_in: Tensor  # [n_layers, n_pos, d_model]  x_L of every layer


@dataclass
class FrozenLayer:
    """The frozen linear pieces of one decoder layer on one prompt."""

    W_V: Tensor  # [n_kv * head_dim, d_model]
    W_O: Tensor  # [d_model, n_heads * head_dim]
    pattern: Pattern  # [n_heads, n_pos, n_pos], banded for sliding-window layers
    k_in: "FrozenNorm"  # input_layernorm
    k_attn: "FrozenNorm"  # post_attention_layernorm
    k_pre: "FrozenNorm"  # pre_feedforward_layernorm
    W_skip: Optional[Tensor] = None  # [d_model, d_model] applied as x @ W_skip
    W_O_gain: Optional[Tensor] = None  # diag(1 + w_attn) W_O, built by the backward on first use
    W_V_gain: Optional[Tensor] = None  # W_V diag(1 + w_in)
    W_skip_gain: Optional[Tensor] = None  # W_skip^T diag(1 + w_pre)


class FrozenNorm(NamedTuple):
    """An RMSNorm with its denominator frozen: ``x -> (x * scale) * gain``, a linear map."""

    scale: Tensor  # [n_pos, 1]  1/rms of the input on the prompt
    gain: Tensor  # [d_model]  1 + w

    def __call__(self, x: Tensor, n: Optional[int] = None) -> Tensor:
        """Apply to ``x [..., n, d_model]`` at the first ``n`` positions (all by default)."""
        return x * (self.scale if n is None else self.scale[:n]) * self.gain

    def at(self, pos: Tensor) -> Tensor:
        """The diagonal factors at positions ``pos [k]``: [k, d_model]."""
        return self.scale[pos] * self.gain


def _norm(scale: Tensor, norm: torch.nn.Module, dtype: torch.dtype) -> FrozenNorm:
    # as Gemma3RMSNorm: (x * rsqrt(mean(x^2) + eps)) * (1 + w), 1 + w in fp32 (fp64 for fp64)
    w = norm.weight.detach()
    return FrozenNorm(scale[:, None].to(dtype), (1.0 + w.to(torch.promote_types(w.dtype, torch.float32))).to(dtype))


class FrozenLinearModel:
    """The linear map (embeddings, MLP-output sources) -> logits of one prompt, and its VJP."""

    def __init__(self, parts: TextParts, cap: Capture, dtype: torch.dtype,
                 W_skip: Optional[list[Optional[Tensor]]] = None):
        cfg = parts.config
        self.n_layers, self.d_model, self.n_pos = parts.n_layers, parts.d_model, cap.n_pos
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = dtype
        # images attend both ways among their soft tokens: then every position can matter
        self.causal = not getattr(cfg, "use_bidirectional_attention", False) and not cap.has_images
        W_skip = W_skip or [None] * self.n_layers
        self.layers: list[FrozenLayer] = []
        for L, (layer, c) in enumerate(zip(parts.layers, cap.layers)):
            attn = layer.self_attn
            if attn.v_proj.bias is not None or attn.o_proj.bias is not None:
                raise ValueError(f"layer {L}: attention biases (Gemma 3 has none): the frozen "
                                 "attention would not be linear")
            self.layers.append(FrozenLayer(
                W_V=attn.v_proj.weight.detach().to(dtype), W_O=attn.o_proj.weight.detach().to(dtype),
                pattern=c.pattern.to(dtype),
                k_in=_norm(c.scale_in, layer.input_layernorm, dtype),
                k_attn=_norm(c.scale_attn, layer.post_attention_layernorm, dtype),
                k_pre=_norm(c.scale_pre, layer.pre_feedforward_layernorm, dtype),
                W_skip=None if W_skip[L] is None else W_skip[L].to(dtype)))
        self.k_final = _norm(cap.scale_final, parts.norm, dtype)
        self.W_U = parts.lm_head.weight.detach()  # [vocab, d_model] (kept in the model dtype)
        self._W_U_mean: Optional[Tensor] = None

    # --- forward ---------------------------------------------------------------------------

    def attention(self, L: int, r: Tensor, start: int = 0) -> Tensor:
        """``h = r + k_attn(attn_P(k_in(r)))``: the residual stream after layer L's frozen
        attention, for ``r [n, C, d_model]`` at positions ``start..`` (position-major, C columns
        carried at once). With the norm gains folded into W_V / W_O and the norm scales into the
        pattern: two GEMMs, the pattern product (:func:`.attention.mix`) and two copies."""
        fl = self.layers[L]
        n, C, d = r.shape
        rep, hd = self.n_heads // self.n_kv, self.head_dim
        self.fold_gains(fl)
        v = (r.reshape(n * C, d) @ fl.W_V_gain.T).view(n, C, self.n_kv, hd)  # [n, C, n_kv, hd]
        v = v.permute(2, 0, 1, 3).reshape(self.n_kv, n, C * hd)
        z = mix(fl.pattern, v, start, fl.k_attn.scale[:, 0], fl.k_in.scale[:, 0])  # [n_kv, rep, n, C * hd]
        z = z.view(self.n_kv, rep, n, C, hd).permute(2, 3, 0, 1, 4).reshape(n * C, self.n_heads * hd)
        return torch.addmm(r.reshape(n * C, d), z, fl.W_O_gain.T).view(n, C, d)

    def run_layers(self, r: Tensor, layer_out: Callable[[int, Tensor], Optional[Tensor]],
                   start: int = 0, first: int = 0, stop: Optional[int] = None,
                   after: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
        """Carry the residual stream ``r [n, C, d_model]`` (positions ``start..``, C columns)
        through layers ``first .. stop - 1`` (default: to the last; then it returns the
        final-norm input).

        Per layer L: ``h = attention(L, r)``, ``x = k_pre(h)`` (the MLP input),
        ``m = layer_out(L, x) + x @ W_skip`` (the MLP output: the sources the caller puts there,
        ``None`` for none, plus the affine skip), ``r = h + m``. The one forward of the frozen
        model: the prompt's forward, the interventions' delta-forward and the forward JVP of
        the attribution columns all run it."""
        for L in range(first, self.n_layers if stop is None else stop):
            fl = self.layers[L]
            h = self.attention(L, r, start)
            x = h * (fl.k_pre.scale[start:, :, None] * fl.k_pre.gain)  # [n, C, d]
            m = layer_out(L, x)
            if fl.W_skip is not None:
                skip = (x.reshape(-1, self.d_model) @ fl.W_skip).view(x.shape)
                m = skip if m is None else m + skip
            r = h if m is None else h + m
            if after is not None:
                after(L, r)  # in place on r_L+1 (a fresh tensor): sparse additions to m_L
        return r

    def forward(self, embed: Tensor, sources: Tensor) -> FrozenOutput:
        """Logits from ``embed [n_pos, d]`` and ``sources [n_layers, n_pos, d]`` (differentiable)."""
        mlp_in = []

        def layer_out(L: int, x: Tensor) -> Tensor:
            mlp_in.append(x[:, 0])
            return sources[L].to(self.dtype)[:, None]

        r = self.run_layers(embed.to(self.dtype)[:, None], layer_out)[:, 0]
        logits = self.k_final(r) @ self.W_U.to(self.dtype).T
        return FrozenOutput(logits, r, torch.stack(mlp_in))

    __call__ = forward

    # --- seeds -----------------------------------------------------------------------------

    def logit_direction(self, token_ids: Tensor) -> Tensor:
        """Unembedding columns minus their vocabulary mean: [T, d_model]."""
        acc = torch.promote_types(self.dtype, torch.float32)
        if self._W_U_mean is None:
            self._W_U_mean = self.W_U.mean(0, dtype=acc)  # [d_model]
        return (self.W_U[token_ids].to(acc) - self._W_U_mean).to(self.dtype)

    # --- the linearised backward -----------------------------------------------------------

    def fold_gains(self, fl: FrozenLayer) -> None:
        """The norms' gains folded into the weights once per layer (elementwise passes less)."""
        if fl.W_O_gain is None:
            fl.W_O_gain = fl.k_attn.gain[:, None] * fl.W_O  # [d_model, n_heads * hd]
            fl.W_V_gain = fl.W_V * fl.k_in.gain  # [n_kv * hd, d_model]
            if fl.W_skip is not None:  # d/d(h) of the skip: (g @ W_skip^T) * gain_pre, per row
                fl.W_skip_gain = fl.W_skip.T * fl.k_pre.gain  # [d_model, d_model]

    def _attn_backward(self, fl: FrozenLayer, grad_h: Tensor,
                       start: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """``grad_h + VJP(r -> post-scaled attention)(grad_h)`` at positions ``start .. n-1``, and
        the share of that VJP that lands on the positions before ``start``.

        Seed-major: ``grad_h [k, n - start, d_model]`` -> ``([k, n - start, d_model],
        [k, start, d_model] or None)``. With the frozen pattern's rows scaled by the
        post-attention norm and its columns by the input norm (``P'_h = diag(s_attn) P_h
        diag(s_in)``, built per call) and the norms' gains folded into W_O / W_V, per KV group
        g of heads h = g·rep .. g·rep+rep-1:

            grad_z    = grad_h @ W_O                          # [k·n, n_heads * hd]
            grad_v_g  = [P'_h^T]_h @ [grad_z_h]_h             # per seed: [n, n·rep] @ [n·rep, hd]
            out       = grad_h + Σ_g grad_v_g @ W_V_g         # [k·n, hd] @ [hd, d_model]

        two GEMMs per group and the pattern product batched over the seeds, the group's heads
        in its inner dimension (banded for a sliding-window layer:
        :func:`cltrace.frozen.attention.mix_t`). A seed's rows (position, head) of grad_z are
        contiguous, so with one KV group (Gemma 3 270M, 1B) nothing is copied."""
        k, m, d = grad_h.shape
        n = start + m
        rep, hd = self.n_heads // self.n_kv, self.head_dim
        self.fold_gains(fl)
        g2 = grad_h.view(k * m, d)
        grad_z = (g2 @ fl.W_O_gain).view(k, m, self.n_kv, rep * hd)
        out, pre = g2, None
        for g in range(self.n_kv):
            gz = grad_z[:, :, g]  # [k, m, rep * hd]: rows (q, h) of hd, a view when n_kv == 1
            gz = gz.reshape(k, m * rep, hd)
            W_V = fl.W_V_gain[g * hd:(g + 1) * hd]  # [hd, d_model]
            grad_v, grad_v_pre = mix_t(fl.pattern, gz, fl.k_attn.scale[:n, 0], fl.k_in.scale[:n, 0],
                                       g, rep, start)  # [k, m, hd], [k, start, hd]
            out = torch.addmm(out, grad_v.view(k * m, hd), W_V)
            if start:
                share = (grad_v_pre.view(k * start, hd) @ W_V).view(k, start, d)
                pre = share if pre is None else pre + share
        return out.view(k, m, d), pre

    def _check(self, seeds: Seeds) -> None:
        B = seeds.n
        if seeds.vec.shape != (B, self.d_model):
            raise ValueError(f"seed vectors must be [B, {self.d_model}], got {tuple(seeds.vec.shape)}")
        if B and (seeds.layer.min() < 0 or seeds.layer.max() > self.n_layers):
            raise ValueError(f"seed layers must lie in [0, {self.n_layers}]")
        if B and (seeds.pos.min() < 0 or seeds.pos.max() >= self.n_pos):
            raise ValueError(f"seed positions must lie in [0, {self.n_pos})")

    def prefix_paths(self, embed: Tensor) -> Tensor:
        """``U [n_layers, s, s, d_model]``: ``U[L, t, p]`` is the residual stream r_L at position
        p of the first s positions when the token embedding ``embed[t]`` is the only input
        (``embed [s, d_model]``: the first s positions' embeddings; no MLP-output sources).

        For a causal model the first s positions attend only among themselves, so this is the
        whole effect of token t there; :meth:`iter_backward_live` with ``prefix=U`` gets the
        direct effects of those tokens from the gradient landing on the prefix as
        ``Σ_L Σ_p grad(r_L[p]) · U[L, t, p]``, without carrying the prefix's positions."""
        sz, d = embed.shape
        # run_layers carries every position; those after the prefix are computed and dropped
        # (one forward of s columns: the cost of a single seed's backward)
        r = embed.new_zeros(self.n_pos, sz, d, dtype=self.dtype)  # position-major [p, t, d]
        diag = torch.arange(sz, device=r.device)
        r[diag, diag] = embed.to(self.dtype)
        paths = [r[:sz].transpose(0, 1)]

        def after(L: int, r_next: Tensor) -> None:
            paths.append(r_next[:sz].transpose(0, 1).clone())

        self.run_layers(r, lambda L, x: None, stop=self.n_layers - 1, after=after)
        return torch.stack(paths)

    def iter_backward_live(self, seeds: Seeds, prefix: Optional[Tensor] = None,
                           at_resid: bool = False) -> Iterator[LayerGrad]:
        """The backward on the live part only, for seeds sorted by layer, highest first.

        Yields for L = n_layers-1 .. 0 ``LayerGrad(L, grad [k_L, n - s, d_model], s)``:
        seed-major d(seed . output)/d(m_L) of the first ``k_L`` seeds (those above layer L: the
        others' gradients there are zero) at positions s .. n-1 (n: max seed position + 1 for a
        causal model: the rest are zero), then ``LayerGrad(EMBED, grad [B, n - s, d_model], s,
        prefix)``. A batch costs Σ_seeds (layer + 1) x (n - s) of the per-position work instead
        of B x n_layers x n_pos; the live seeds are a prefix of the rows, so every product is
        one GEMM on a contiguous block. Yielded tensors are never modified afterwards.

        ``at_resid``: a seed of layer L is a direction on the residual stream ``r_L`` itself,
        the input of layer L (L = n_layers: the final norm's input), applied as given (no
        norm); it is live at the steps of the layers below L. (Otherwise it is read at the MLP
        input ``x_L`` through the frozen pre-FF norm, or at layer n_layers through the final
        norm.) Attention scores are read this way (:mod:`cltrace.attention.qk`).

        ``prefix`` (:meth:`prefix_paths` of the first s positions; causal models, seeds at
        positions >= s): the first s positions are not carried; the gradient that lands on
        them is dotted with the paths instead, and ``prefix [B, s]`` holds the direct effects
        of the first s tokens (their gradients, which only those edges need, are not formed).
        Without it s = 0."""
        self._check(seeds)
        if seeds.n > 1 and bool((seeds.layer[1:] > seeds.layer[:-1]).any()):
            raise ValueError("iter_backward_live needs seeds sorted by layer, highest first")
        B, N, d = seeds.n, self.n_pos, self.d_model
        s = 0 if prefix is None else prefix.shape[1]
        if s and not (self.causal and (B == 0 or int(seeds.pos.min()) >= s)):
            raise ValueError(f"a prefix of {s} positions needs a causal model and seeds at positions >= {s}")
        n = int(seeds.pos.max()) + 1 if (B and self.causal) else N  # positions that matter
        # live[L] = number of seeds at layer >= L (a prefix, since seeds are sorted)
        live = [int((seeds.layer >= L).sum()) for L in range(self.n_layers + 2)]
        g = torch.zeros(live[self.n_layers], n - s, d, dtype=self.dtype, device=self.W_U.device)
        edges_prefix = g.new_zeros(B, s)
        self._inject(g, seeds, self.n_layers, None if at_resid else self.k_final, s)  # grad w.r.t. r_n
        for L in range(self.n_layers - 1, -1, -1):
            fl = self.layers[L]
            yield LayerGrad(L, g, s)  # r_L+1 = h_L + m_L: d/d(m_L) = d/d(r_L+1)
            k0 = g.shape[0]
            k1 = k0 if at_resid else live[L]  # rows of d/d(h_L): the seeds read at x_L join
            if k1:
                # d/d(h_L) = g + k_pre(d/d(x_L)), d/d(x_L) = skip share of g + the seeds read at L
                grad_h = g if k1 == k0 and fl.W_skip is None else g.new_empty(k1, n - s, d)
                if fl.W_skip is not None and k0:
                    self.fold_gains(fl)
                    skip = (g.view(-1, d) @ fl.W_skip_gain).view(g.shape)
                    torch.addcmul(g, skip, fl.k_pre.scale[None, s:n], out=grad_h[:k0])
                elif grad_h is not g:
                    grad_h[:k0] = g
                if k1 > k0:  # grad_h is a fresh tensor here: the seeds read at L start at zero
                    grad_h[k0:].zero_()
                    self._inject(grad_h, seeds, L, fl.k_pre, s)
                g, landed = self._attn_backward(fl, grad_h, s)  # landed: d/d(r_L) at positions < s
                if landed is not None:
                    edges_prefix[:k1] += torch.einsum("bpd,tpd->bt", landed, prefix[L])
            if at_resid and live[L] > g.shape[0]:  # the seeds on r_L join: d/d(r_L) += seed
                g = torch.cat([g, g.new_zeros(live[L] - g.shape[0], n - s, d)])
                self._inject(g, seeds, L, None, s)
        yield LayerGrad(EMBED, g, s, edges_prefix if s else None)

    def _inject(self, grad: Tensor, seeds: Seeds, layer: int, k: Optional[FrozenNorm],
                start: int = 0) -> None:
        """Add the seeds of ``layer`` (through the frozen norm ``k``) to ``grad [k, n - start, d]``
        (rows: positions start ..)."""
        sel = (seeds.layer == layer).nonzero().flatten()
        if sel.numel() == 0:
            return
        pos = seeds.pos[sel]
        vec = seeds.vec[sel].to(self.dtype)  # [n_sel, d_model]
        grad.index_put_((sel, pos - start), vec if k is None else vec * k.at(pos), accumulate=True)
