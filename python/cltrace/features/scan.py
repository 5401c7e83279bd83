"""Pass 1 over the corpus: one forward pass (up to the input site of the last layer asked for)
and one JumpReLU encode per layer per token, folded into the bounded :class:`FeatureState`.

The features read the set's input site (``site_in``, :mod:`cltrace.models.sites`): the MLP
input for transcoders, ``resid_post``, ``attn_out`` or ``mlp_out`` for SAEs and crosscoders.
Rows of tokens (``[n_rows, ctx]``, each starting with BOS, from
:func:`cltrace.training.corpus.token_rows`) are read in batches by
:class:`cltrace.models.activations.ActivationSource` (input sites only: decoder stack only,
stopped after the last site needed); BOS positions get no activations (as in the graphs). A token is named by its global
id ``row * ctx + pos``, so shards (disjoint row subsets) and resumed runs address the same
tokens; the state after each batch depends only on which rows were folded in.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..models.activations import ActivationSource
from ..ops import jumprelu_encode
from .state import FeatureState


class Encoder(NamedTuple):
    """The encoder of one layer's transcoder, as the compiled op wants it."""

    W_enc: Tensor  # [d_model, d_sae]
    b_enc: Tensor  # [d_sae]
    threshold: Tensor  # [d_sae]


def layer_encoders(transcoders, layers: Sequence[int], dtype=torch.float32) -> dict[int, Encoder]:
    """Contiguous ``dtype`` copies of the encoders of ``layers`` (decoders are not touched)."""
    out = {}
    for L in layers:
        tc = transcoders.layers[L]
        out[L] = Encoder(*(t.to(dtype).contiguous() for t in (tc.W_enc, tc.b_enc, tc.threshold)))
    return out


def token_ids(rows: Tensor, idx: Tensor, bos: Optional[int]) -> Tensor:
    """Global ids ``row * ctx + pos`` of the non-BOS tokens of rows ``idx [n]``, in the order
    ActivationSource returns their activations: ``[T]`` int64."""
    ctx = rows.shape[1]
    ids = rows[idx]  # [n, ctx]
    tok = idx.unsqueeze(1) * ctx + torch.arange(ctx)
    return tok[ids != bos] if bos is not None else tok.flatten()


def encode_batch(encoders: dict[int, Encoder], x: Tensor):
    """Yield ``(layer, rows [nnz], feat [nnz], act [nnz])`` of the firing (act > 0) features of
    ``x [n_layers_kept, T, d_model]``; one compiled encode per layer."""
    for i, (L, enc) in enumerate(encoders.items()):
        sa = jumprelu_encode(x[i].contiguous(), enc.W_enc, enc.b_enc, enc.threshold)
        r, f, a = sa.rows(), sa.feat_idx, sa.acts
        pos = a > 0
        yield L, r[pos], f[pos], a[pos]


def scan(model, rows: Tensor, encoders: dict[int, Encoder], state: FeatureState, *,
         bos: Optional[int], row_ids: Optional[Tensor] = None, batch_rows: int = 16,
         checkpoint: Optional[Callable[[FeatureState], None]] = None, every_s: float = 60.0,
         bar: bool = True, site: str = "mlp_in") -> FeatureState:
    """Fold the rows ``row_ids`` (default all) of ``rows [n_rows, ctx]`` into ``state``, the
    features encoded from the activations at ``site`` (the set's ``site_in``).

    Batches of ``batch_rows`` rows; ``state.meta["next_batch"]`` says where a resumed run
    restarts. ``checkpoint(state)`` is called every ``every_s`` seconds and at the end."""
    if rows.shape[1] != state.ctx:
        raise ValueError(f"rows of {rows.shape[1]} tokens but the state was made for ctx {state.ctx}")
    row_ids = torch.arange(rows.shape[0]) if row_ids is None else row_ids.long()
    src = ActivationSource(model, rows, list(encoders), bos, batch_rows, outputs=False,
                           site_in=site)
    batches = list(torch.split(row_ids, batch_rows))
    start = int(state.meta.get("next_batch", 0))
    per_row = tokens_per_row(rows, bos)
    total = int(per_row[row_ids].sum())
    done = int(per_row[torch.cat(batches[:start])].sum()) if start else 0
    pbar = scan_bar(total, done, bar)
    last = time.monotonic()
    try:
        for b in range(start, len(batches)):
            idx = batches[b]
            acts = src.read(idx)  # x [n_layers_kept, T, width]
            tok = token_ids(rows, idx, bos)  # [T]
            for L, r, f, a in encode_batch(encoders, acts.x):
                state.update(L, f, a, tok[r])
            state.n_tokens += tok.numel()
            state.meta["next_batch"] = b + 1
            pbar.update(tok.numel())
            if checkpoint is not None and time.monotonic() - last > every_s:
                checkpoint(state)
                last = time.monotonic()
    finally:
        pbar.close()
    if checkpoint is not None:
        checkpoint(state)
    return state


def tokens_per_row(rows: Tensor, bos: Optional[int]) -> Tensor:
    """The tokens of each row that get activations (all but BOS): ``[n_rows]``."""
    return (rows != bos).sum(1) if bos is not None else torch.full((rows.shape[0],), rows.shape[1])


def scan_bar(total: int, done: int, enabled: bool, desc: str = "feature scan"):
    """The scan's progress bar over tokens (with tokens/s and ETA)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not enabled,
                desc=desc, dynamic_ncols=True)
