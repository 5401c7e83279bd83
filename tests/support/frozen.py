"""The frozen linear model's backward in the forms the tests check it in: logit seeds, and every
layer's gradient for seeds in any order, at every position.

Attribution uses :meth:`cltrace.frozen.FrozenLinearModel.iter_backward_live` (seeds sorted by
layer, live rows and positions only); :func:`iter_backward` scatters its steps back to the
full ``[B, n_pos, d_model]`` gradients that autograd and the completeness identity are checked
against, and :func:`backward` keeps them all (small cases).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from cltrace.frozen import EMBED, FrozenLinearModel, LayerGrad, Seeds


class FrozenGrads(NamedTuple):
    mlp_out: Tensor  # [n_layers, B, n_pos, d_model]  d(seeds)/d(m_L)
    embed: Tensor  # [B, n_pos, d_model]  d(seeds)/d(e)


def logit_seeds(st, token_ids: Union[Tensor, Sequence[int]], pos: Union[int, Tensor] = -1) -> Seeds:
    """Backward seeds of the logit directions of ``token_ids`` (unembedding minus its vocabulary
    mean) at ``pos`` (default: the last position) of a replacement state ``st``."""
    fz = st.frozen
    token_ids = torch.as_tensor(token_ids, device=fz.W_U.device).reshape(-1)
    pos = torch.as_tensor(pos, device=token_ids.device).expand(token_ids.shape) % fz.n_pos
    return Seeds(torch.full_like(token_ids, fz.n_layers), pos.long(), fz.logit_direction(token_ids))


def iter_backward(fz: FrozenLinearModel, seeds: Seeds) -> Iterator[LayerGrad]:
    """Yield d(seed . output)/d(m_L) for L = n_layers-1 .. 0, then d/d(embed) (layer EMBED).

    Seeds in any order; each yielded ``grad`` is ``[B, n_pos, d_model]`` in seed order (a fresh
    tensor). Transcoder features and error nodes are constants: only the residual stream, the
    frozen attention (OV with frozen patterns) and the affine skip carry gradient."""
    order = seeds.layer.argsort(descending=True, stable=True)
    for step in fz.iter_backward_live(Seeds(*(t[order] for t in seeds))):
        g = step.grad  # [k, n, d]
        full = g.new_zeros(seeds.n, fz.n_pos, fz.d_model)
        full[order[:g.shape[0]], :g.shape[1]] = g
        yield LayerGrad(step.layer, full)


def backward(fz: FrozenLinearModel, seeds: Seeds) -> FrozenGrads:
    """All of :func:`iter_backward` at once (holds n_layers + 1 gradients: small cases)."""
    mlp_out: list[Optional[Tensor]] = [None] * fz.n_layers
    embed = None
    for step in iter_backward(fz, seeds):
        if step.layer == EMBED:
            embed = step.grad
        else:
            mlp_out[step.layer] = step.grad
    return FrozenGrads(torch.stack(mlp_out), embed)
