"""Activations of a model on batches of token rows, at the sites a dictionary reads and writes.

:class:`ActivationSource` runs the model on a batch of rows and records, per layer, the
dictionary's input site (default the MLP input, ``pre_feedforward_layernorm`` output) and
output site (default the MLP output, ``post_feedforward_layernorm`` output; for an SAE, whose
sites are one, the input itself); see :mod:`cltrace.models.sites`. BOS positions are dropped
(their activations are outliers that no dictionary should fit). It stops after the last site
needed (no unembedding); with ``outputs=False`` it records only the input sites (what an
encoder needs). Reading is deterministic: rows are addressed by index, so a resumed run reads
the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Activations:
    """MLP inputs and outputs of some layers on a batch of tokens (BOS positions dropped)."""

    x: Tensor  # [n_layers_kept, T, width]  the input site (the MLP input for transcoders)
    y: Optional[Tensor]  # [n_layers_kept, T, width]  the output site (the target; x itself for
    #                      an SAE); None when the source was made with outputs=False


class ActivationSource:
    """Activations of ``model`` at ``site_in`` (and ``site_out``) of ``layers`` on token
    ``rows [n_rows, ctx]``, read by row index.

    ``read(idx)`` runs the rows ``idx [n]`` through the decoder stack only (no unembedding;
    it stops after the last site needed)."""

    def __init__(self, model, rows: Tensor, layers: Sequence[int], bos_token_id: Optional[int],
                 batch_rows: int = 8, cache_dtype: Optional[torch.dtype] = None,
                 outputs: bool = True, site_in: str = "mlp_in", site_out: str = "mlp_out"):
        from .anatomy import text_parts
        from .sites import check_site

        self.parts = text_parts(model)
        self.rows, self.layers, self.bos = rows, list(layers), bos_token_id
        self.batch_rows = batch_rows
        self.outputs = outputs  # False: input sites only (y is None): a shorter pass
        self.site_in, self.site_out = check_site(site_in), check_site(site_out)
        # With cache_dtype, every row read is kept in memory in that dtype (and always served
        # from there, so a resumed run sees the same values): later epochs cost no model pass.
        self.cache_dtype = cache_dtype
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def tokens_per_row(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def cached_bytes(self) -> int:
        return sum(x.nbytes + (y.nbytes if y is not None and y is not x else 0)
                   for x, y in self._cache.values())

    @torch.no_grad()
    def read(self, idx: Tensor) -> Activations:
        """Activations of the rows ``idx [n]``: ``x, y [n_layers_kept, T, width]`` float32."""
        wanted = [int(i) for i in idx]
        store = self._cache if self.cache_dtype is not None else {}
        todo = list(dict.fromkeys(i for i in wanted if i not in store))
        for b in range(0, len(todo), self.batch_rows):
            chunk = todo[b:b + self.batch_rows]
            ids = self.rows[chunk]
            x, y = self._run(ids)  # [L, B, ctx, d] each
            keep = (ids != self.bos) if self.bos is not None else torch.ones_like(ids, dtype=torch.bool)
            dt = self.cache_dtype or torch.float32
            for r, i in enumerate(chunk):
                k = keep[r].to(x.device)
                xi = x[:, r, k].to("cpu", dt)
                store[i] = (xi, None if y is None else xi if y is x else y[:, r, k].to("cpu", dt))
        xs = [store[i][0] for i in wanted]
        if not self.outputs:
            return Activations(torch.cat(xs, 1).float(), None)
        if self.site_out == self.site_in:  # an SAE: the target is the input itself
            x = torch.cat(xs, 1).float()
            return Activations(x, x)
        ys = [store[i][1] for i in wanted]
        return Activations(torch.cat(xs, 1).float(), torch.cat(ys, 1).float())

    def _run(self, ids: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        from .sites import run_sites

        ins = [(self.site_in, L) for L in self.layers]
        outs = [(self.site_out, L) for L in self.layers] if self.outputs else []
        rec = run_sites(self.parts, ids, ins + outs)
        x = torch.stack([rec[s] for s in ins])  # [L, B, ctx, width]
        if not self.outputs:
            return x, None
        return x, (x if outs == ins else torch.stack([rec[s] for s in outs]))
