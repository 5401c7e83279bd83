"""Top and bottom logits: the direct effect of a feature's decoder direction on the output.

``logits_f = (d_f * (1 + w_norm)) @ W_U^T``, demeaned over the vocabulary, with ``w_norm`` the
final RMSNorm's weight (Gemma scales by ``1 + w``; the RMS denominator is a positive scalar and
does not change the ranking) and ``W_U [vocab, d_model]`` the (tied) unembedding. Pages list
the tokens only, and subtracting the vocabulary mean (one constant per feature) does not change
which tokens are top or bottom, so the mean is not computed.
``d_f`` is the feature's total write to the residual stream: for a per-layer transcoder its
decoder row; for a CLT the SUM of its decoder rows over all the layers it writes to (every
write is added to the residual stream, so the sum is its whole direct path to the logits).
Cost: ``2 * d_model * vocab`` FLOP per feature (335 MFLOP for Gemma 3), features in chunks.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def decoder_directions(transcoders, layer: int, feats: Tensor) -> Tensor:
    """``d_f`` of the features ``feats [n]`` of ``layer``: ``[n, d_model]`` float32."""
    W = transcoders.layers[layer].W_dec  # [d_sae, n_out, d_model]
    return W[feats].float().sum(1)


@torch.no_grad()
def top_bottom_logits(model, transcoders, layer: int, feats: Tensor, n: int = 10,
                      chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Token ids of the ``n`` most promoted and most suppressed tokens of each feature
    ``feats [F]``: ``(top [F, n], bottom [F, n])`` int64, strongest first."""
    from ..models.anatomy import text_parts

    parts = text_parts(model)
    W_U = parts.lm_head.weight.detach().float()  # [vocab, d_model]
    gain = 1.0 + parts.norm.weight.detach().float()  # [d_model]
    n = min(n, W_U.shape[0])
    tops, bottoms = [], []
    for c in torch.split(feats, chunk):
        d = decoder_directions(transcoders, layer, c).to(W_U.device) * gain  # [c, d_model]
        lg = d @ W_U.T  # [c, vocab]  (the demeaned logits + a per-row constant)
        tops.append(lg.topk(n, dim=1).indices.cpu())
        bottoms.append(lg.topk(n, dim=1, largest=False).indices.cpu())
    if not tops:
        empty = torch.zeros(0, n, dtype=torch.int64)
        return empty, empty
    return torch.cat(tops), torch.cat(bottoms)


def token_strings(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """The text of each token id (decoded one by one, as the viewer shows it)."""
    uniq = sorted(set(int(i) for i in ids))
    texts = tokenizer.batch_decode([[i] for i in uniq]) if uniq else []
    return dict(zip(uniq, texts))
