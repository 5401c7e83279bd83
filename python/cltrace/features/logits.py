"""Top and bottom logits: the direct effect of a feature's decoder direction on the output.

``logits_f = (d_f * (1 + w_norm)) @ W_U^T``, demeaned over the vocabulary, with ``w_norm`` the
final RMSNorm's weight (Gemma scales by ``1 + w``; the RMS denominator is a positive scalar and
does not change the ranking) and ``W_U [vocab, d_model]`` the (tied) unembedding. Pages list
the tokens only, and subtracting the vocabulary mean (one constant per feature) does not change
which tokens are top or bottom, so the mean is not subtracted from the logits themselves.
``d_f`` is the feature's write to the residual stream (:func:`decoder_directions`): for a
per-layer transcoder its decoder row; for a CLT the SUM of its decoder rows over all the layers
it writes to (every write is added to the residual stream, so the sum is its whole direct path
to the logits). For SAEs: at ``resid_post`` and ``mlp_out`` (after
``post_feedforward_layernorm``, added to the stream as it is) the decoder row is a residual
direction; for a crosscoder (``resid_post`` of several layers, each row reconstructing the
whole stream at its layer, not adding to it) the row of its LAST layer, the stream nearest the
unembedding; at ``attn_out`` (``o_proj``'s input) the row pushed through ``o_proj`` and the gain
of ``post_attention_layernorm``: ``(W_O w) * (1 + w_attn_norm)``. That RMSNorm divides the
whole attention output by its RMS, a positive scalar per token shared by every write, so the
feature's share of what is added to the stream is that direction times a positive factor:
exact for the ranking of tokens and the score (both scale-free), not for the magnitude.
Cost: ``2 * d_model * vocab`` FLOP per feature (335 MFLOP for Gemma 3), features in chunks.

How far the top logit stands out (``score``, what decides whether a label shows it, see
:data:`cltrace.features.pages.LOGIT_LABEL_MIN_SCORE`): ``(max - mean) / std`` of the feature's
logits over the whole vocabulary (population std), computed in closed form: with ``g = d_f *
(1 + w_norm)``, ``mean = g . mu`` and ``std^2 = g^T C g`` where ``mu`` and ``C`` are the mean and
covariance (divided by vocab) of the unembedding's rows, computed once (:func:`unembedding`),
so the score costs ``O(d_model^2)`` per feature beside the logits' ``O(d_model * vocab)``. The
score does not change when every logit is shifted by a constant or scaled by a positive factor,
so neither the demeaning nor the RMS denominator affects it. A single token moves the std of
262k logits by a negligible amount, so the std is not inflated by the outlier it judges. Score
``inf`` when the std is 0 and the max is above the mean, 0 when every logit is equal (a zero
decoder row). Why not the median and MAD: on 768 starter features the MAD-based score
``(max - median) / (1.4826 MAD)`` follows this one (correlation 0.96, 1.03 times it at the
median), and exact medians over the vocabulary cost 2.5 times the logits' own matmul on a CPU.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class Unembedding(NamedTuple):
    W_U: Tensor  # [vocab, d_model] float32
    gain: Tensor  # [d_model] float32: 1 + the final norm's weight
    mean: Tensor  # [d_model] float64: the mean row of W_U
    cov: Tensor  # [d_model, d_model] float64: sum_v (W_U[v] - mean)(W_U[v] - mean)^T / vocab


class FeatureLogits(NamedTuple):
    top: Tensor  # [F, n] int64 token ids, most promoted first
    bottom: Tensor  # [F, n] int64 token ids, most suppressed first
    score: Tensor  # [F] float64: (top logit - mean) / std over the vocabulary (module doc)


def _unembedding_and_gain(model) -> tuple[Tensor, Tensor]:
    from ..models.anatomy import text_parts

    parts = text_parts(model)
    W_U = parts.lm_head.weight.detach().float()  # [vocab, d_model]
    return W_U, 1.0 + parts.norm.weight.detach().float()  # [d_model]


@torch.no_grad()
def unembedding(model, chunk: int = 16384) -> Unembedding:
    """The unembedding, its gain, and its rows' mean and covariance (float64 accumulation over
    vocabulary chunks of float32 products of centred rows; ``2 * vocab * d_model^2`` FLOP, once
    per build)."""
    W_U, gain = _unembedding_and_gain(model)
    vocab, d = W_U.shape
    mean = sum(c.double().sum(0) for c in torch.split(W_U, chunk)) / vocab
    m32 = mean.float()
    cov = torch.zeros(d, d, dtype=torch.float64, device=W_U.device)
    for c in torch.split(W_U, chunk):
        x = c - m32
        cov += (x.T @ x).double()
    return Unembedding(W_U, gain, mean, cov / vocab)


def decoder_directions(transcoders, layer: int, feats: Tensor, model=None) -> Tensor:
    """``d_f`` of the features ``feats [n]`` of ``layer`` (module doc): ``[n, d_model]``
    float32. ``model`` (its ``o_proj`` and ``post_attention_layernorm``) is needed for an
    ``attn_out`` set only."""
    ts = transcoders
    W = ts.layers[layer].W_dec[feats].float()  # [n, n_out, d_out]
    site = getattr(ts, "site_out", "mlp_out")
    if site == "resid_post":
        return W[:, -1]  # an SAE's one row; a crosscoder's row for its last layer
    if site == "attn_out":
        from ..models.anatomy import text_parts

        if model is None:
            raise ValueError("the logit directions of attn_out features need the model")
        block = text_parts(model).layers[layer]
        W_O = block.self_attn.o_proj.weight.detach().float().to(W.device)  # [d_model, heads*hd]
        gain = 1.0 + block.post_attention_layernorm.weight.detach().float().to(W.device)
        return (W[:, 0] @ W_O.T) * gain
    return W.sum(1)  # mlp_out: transcoders, CLTs (their writes add up), mlp_out SAEs


def outlier_score(top: Tensor, g: Tensor, U: Unembedding) -> Tensor:
    """``(top - mean) / std`` of the logits of the directions ``g [F, d_model]`` (gain applied)
    whose largest logits are ``top [F]``: ``[F]`` float64 (module doc)."""
    g64 = g.double().to(U.cov.device)
    mean = g64 @ U.mean
    var = ((g64 @ U.cov) * g64).sum(1).clamp_min(0.0)
    rise = top.double().to(mean.device) - mean
    std = var.sqrt()
    score = rise / std.clamp_min(torch.finfo(torch.float64).tiny)
    zero = torch.zeros_like(score)
    return torch.where(std > 0, score, torch.where(rise > 0, zero + torch.inf, zero)).cpu()


@torch.no_grad()
def feature_logits(model, transcoders, layer: int, feats: Tensor, n: int = 10,
                   chunk: int = 256, unemb: Optional[Unembedding] = None,
                   score: bool = True) -> FeatureLogits:
    """The ``n`` most promoted and most suppressed tokens of each feature ``feats [F]`` and how
    far its top logit stands out (``score``, module doc; with ``score=False`` it is NaN and the
    unembedding's moments are not computed). ``unemb``: :func:`unembedding` of ``model``
    (computed here when needed and not given; pass it to reuse it across layers)."""
    if unemb is not None:
        W_U, gain, U = unemb.W_U, unemb.gain, unemb
    elif score:
        U = unembedding(model)
        W_U, gain = U.W_U, U.gain
    else:
        (W_U, gain), U = _unembedding_and_gain(model), None
    n = min(n, W_U.shape[0])
    tops, bottoms, scores = [], [], []
    for c in torch.split(feats, chunk):
        g = decoder_directions(transcoders, layer, c, model).to(W_U.device) * gain  # [c, d_model]
        lg = g @ W_U.T  # [c, vocab]  (the demeaned logits + a per-row constant)
        top = lg.topk(n, dim=1)
        tops.append(top.indices.cpu())
        bottoms.append(lg.topk(n, dim=1, largest=False).indices.cpu())
        scores.append(outlier_score(top.values[:, 0], g, U) if score
                      else torch.full((c.numel(),), torch.nan, dtype=torch.float64))
    if not tops:
        empty = torch.zeros(0, n, dtype=torch.int64)
        return FeatureLogits(empty, empty, torch.zeros(0, dtype=torch.float64))
    return FeatureLogits(torch.cat(tops), torch.cat(bottoms), torch.cat(scores))


def top_bottom_logits(model, transcoders, layer: int, feats: Tensor, n: int = 10,
                      chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Token ids of the ``n`` most promoted and most suppressed tokens of each feature
    ``feats [F]``: ``(top [F, n], bottom [F, n])`` int64, strongest first."""
    fl = feature_logits(model, transcoders, layer, feats, n, chunk, score=False)
    return fl.top, fl.bottom


def token_strings(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """The text of each token id (decoded one by one, as the viewer shows it)."""
    uniq = sorted(set(int(i) for i in ids))
    texts = tokenizer.batch_decode([[i] for i in uniq]) if uniq else []
    return dict(zip(uniq, texts))
