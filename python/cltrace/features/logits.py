"""Top and bottom logits: the direct effect of a feature's decoder direction on the output.

``logits_f = (d_f * (1 + w_norm)) @ W_U^T``, demeaned over the vocabulary, with ``w_norm`` the
final RMSNorm's weight (Gemma scales by ``1 + w``; the RMS denominator is a positive scalar and
does not change the ranking) and ``W_U [vocab, d_model]`` the (tied) unembedding. Pages list
the tokens only, and subtracting the vocabulary mean (one constant per feature) does not change
which tokens are top or bottom, so the mean is not subtracted from the logits themselves.
``d_f`` is the feature's total write to the residual stream: for a per-layer transcoder its
decoder row; for a CLT the SUM of its decoder rows over all the layers it writes to (every
write is added to the residual stream, so the sum is its whole direct path to the logits).
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
decoder row).
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


@torch.no_grad()
def unembedding(model, chunk: int = 16384) -> Unembedding:
    """The unembedding, its gain, and its rows' mean and covariance (float64 accumulation over
    vocabulary chunks of float32 products of centred rows)."""
    from ..models.anatomy import text_parts

    parts = text_parts(model)
    W_U = parts.lm_head.weight.detach().float()  # [vocab, d_model]
    gain = 1.0 + parts.norm.weight.detach().float()  # [d_model]
    vocab, d = W_U.shape
    mean = sum(c.double().sum(0) for c in torch.split(W_U, chunk)) / vocab
    m32 = mean.float()
    cov = torch.zeros(d, d, dtype=torch.float64, device=W_U.device)
    for c in torch.split(W_U, chunk):
        x = c - m32
        cov += (x.T @ x).double()
    return Unembedding(W_U, gain, mean, cov / vocab)


def decoder_directions(transcoders, layer: int, feats: Tensor) -> Tensor:
    """``d_f`` of the features ``feats [n]`` of ``layer``: ``[n, d_model]`` float32."""
    W = transcoders.layers[layer].W_dec  # [d_sae, n_out, d_model]
    return W[feats].float().sum(1)


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
                   chunk: int = 256, unemb: Optional[Unembedding] = None) -> FeatureLogits:
    """The ``n`` most promoted and most suppressed tokens of each feature ``feats [F]`` and how
    far its top logit stands out (``score``, module doc). ``unemb``: :func:`unembedding` of
    ``model`` (computed here when not given; pass it to reuse it across layers)."""
    U = unembedding(model) if unemb is None else unemb
    n = min(n, U.W_U.shape[0])
    tops, bottoms, scores = [], [], []
    for c in torch.split(feats, chunk):
        g = decoder_directions(transcoders, layer, c).to(U.W_U.device) * U.gain  # [c, d_model]
        lg = g @ U.W_U.T  # [c, vocab]  (the demeaned logits + a per-row constant)
        top = lg.topk(n, dim=1)
        tops.append(top.indices.cpu())
        bottoms.append(lg.topk(n, dim=1, largest=False).indices.cpu())
        scores.append(outlier_score(top.values[:, 0], g, U))
    if not tops:
        empty = torch.zeros(0, n, dtype=torch.int64)
        return FeatureLogits(empty, empty, torch.zeros(0, dtype=torch.float64))
    return FeatureLogits(torch.cat(tops), torch.cat(bottoms), torch.cat(scores))


def top_bottom_logits(model, transcoders, layer: int, feats: Tensor, n: int = 10,
                      chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Token ids of the ``n`` most promoted and most suppressed tokens of each feature
    ``feats [F]``: ``(top [F, n], bottom [F, n])`` int64, strongest first."""
    fl = feature_logits(model, transcoders, layer, feats, n, chunk)
    return fl.top, fl.bottom


def token_strings(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """The text of each token id (decoded one by one, as the viewer shows it)."""
    uniq = sorted(set(int(i) for i in ids))
    texts = tokenizer.batch_decode([[i] for i in uniq]) if uniq else []
    return dict(zip(uniq, texts))
