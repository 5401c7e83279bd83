"""Pass 2: the activation of a feature on every token of a window around each kept example.

Only the rows that hold a kept example (top-K or sampled) of some feature are run again
through the model and encoded; for each example ``(feature f, token t)`` the activations of f
on the tokens ``t - w .. t + w`` of the same row are cut out and written into a per-layer
array ``[d_sae, K + S, 2w + 1]`` (float16; a file-backed memmap for large sets, so the windows
never all sit in RAM). Slot ``j < K`` is the j-th top example, slot ``K + j`` the j-th sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..models.activations import ActivationSource
from .scan import Encoder, encode_batch, token_ids
from .selection import EMPTY_TOK
from .state import FeatureState


def kept_examples(state: FeatureState, layer: int):
    """``(feat [E], slot [E], tok [E])`` of the filled top and sample slots of ``layer``,
    sorted by token id."""
    st = state.layers[layer]
    tok = torch.cat([st.top.tok, st.sample.tok], 1)  # [d_sae, K + S]
    filled = tok != EMPTY_TOK
    feat, slot = torch.nonzero(filled, as_tuple=True)
    t = tok[filled]
    o = torch.sort(t, stable=True).indices
    return feat[o], slot[o], t[o]


def window_arrays(state: FeatureState, window: int, folder: Optional[Path]) -> dict[int, np.ndarray]:
    """Zeroed ``[d_sae, K + S, 2w + 1]`` float16 arrays per layer (memmaps under ``folder``)."""
    out = {}
    for L, st in state.layers.items():
        shape = (st.d_sae, state.top_k + state.n_samples, 2 * window + 1)
        if folder is None:
            out[L] = np.zeros(shape, dtype=np.float16)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            out[L] = np.lib.format.open_memmap(folder / f"windows_L{L}.npy", mode="w+",
                                               dtype=np.float16, shape=shape)
    return out


def cut_windows(model, rows: Tensor, encoders: dict[int, Encoder], state: FeatureState, *,
                bos: Optional[int], window: int = 16, batch_rows: int = 16,
                folder: Optional[Path] = None, bar: bool = True,
                site: str = "mlp_in") -> dict[int, np.ndarray]:
    """The windows of every kept example (see the module docstring), the features encoded
    from the activations at ``site``: ``{layer: array}``."""
    from tqdm.auto import tqdm

    ctx = state.ctx
    ex = {L: kept_examples(state, L) for L in encoders}
    needed = torch.unique(torch.cat([t // ctx for _, _, t in ex.values()] + [torch.zeros(0, dtype=torch.long)]))
    out = window_arrays(state, window, folder)
    src = ActivationSource(model, rows, list(encoders), bos, batch_rows, outputs=False,
                           site_in=site)
    offsets = torch.arange(-window, window + 1)
    for idx in tqdm(torch.split(needed, batch_rows), desc="example windows", unit="batch",
                    disable=not bar, dynamic_ncols=True):
        acts = src.read(idx)
        tok = token_ids(rows, idx, bos)  # [T]
        lo_tok, hi_tok = int(idx[0]) * ctx, (int(idx[-1]) + 1) * ctx
        for L, r, f, a in encode_batch(encoders, acts.x):
            feat, slot, t = ex[L]
            lo, hi = torch.searchsorted(t, torch.tensor([lo_tok, hi_tok])).tolist()
            if hi == lo:
                continue
            feat, slot, t = feat[lo:hi], slot[lo:hi], t[lo:hi]
            if f.numel() == 0:  # nothing fired in these rows: the windows stay zero
                continue
            d = state.layers[L].d_sae
            keys, o = torch.sort(tok[r] * d + f)  # [nnz] one per (token, feature)
            vals = a[o]
            q = t.unsqueeze(1) + offsets  # [E, W] token ids of the window
            same_row = (q // ctx) == (t // ctx).unsqueeze(1)
            qk = q.clamp(min=0) * d + feat.unsqueeze(1)
            pos = torch.searchsorted(keys, qk).clamp(max=keys.numel() - 1)
            hit = same_row & (keys[pos] == qk)
            win = torch.where(hit, vals[pos], torch.zeros((), dtype=vals.dtype))
            out[L][feat.numpy(), slot.numpy()] = np.clip(win.numpy(), -65504, 65504).astype(np.float16)
    for arr in out.values():
        if isinstance(arr, np.memmap):
            arr.flush()
    return out
