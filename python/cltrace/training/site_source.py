"""Activations at one site (resid_post, attn_out, mlp_out) of some layers, for training SAEs.

:class:`SiteActivationSource` reads like :class:`cltrace.models.activations.ActivationSource`
(``read(idx)``, ``n_rows``, ``tokens_per_row``, ``rows``) but records the activation at
``site`` of each layer with :func:`cltrace.models.sites.site_hooks`, and returns it as both
the input ``x`` and the target ``y`` (one tensor: an SAE reconstructs what it reads). BOS
positions are dropped; the pass stops after the last layer's site (no unembedding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..models.activations import Activations
from ..models.anatomy import text_parts
from ..models.sites import check_site, site_hooks


class _Stop(Exception):
    pass


class SiteActivationSource:
    """Activations at ``site`` of ``layers`` of ``model`` on token ``rows [n_rows, ctx]``."""

    def __init__(self, model, rows: Tensor, site: str, layers: Sequence[int],
                 bos_token_id: Optional[int], batch_rows: int = 8,
                 cache_dtype: Optional[torch.dtype] = None):
        self.parts = text_parts(model)
        self.site = check_site(site)
        self.rows, self.layers, self.bos = rows, list(layers), bos_token_id
        self.batch_rows, self.cache_dtype = batch_rows, cache_dtype
        self.device = self.parts.lm_head.weight.device
        inner = getattr(model, "model", None)
        self.body = getattr(inner, "language_model", inner)  # the decoder stack
        self._cache: dict[int, Tensor] = {}  # row -> [n_layers_kept, T, width] (cache_dtype)

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    @property
    def tokens_per_row(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def cached_bytes(self) -> int:
        return sum(x.nbytes for x in self._cache.values())

    @torch.no_grad()
    def read(self, idx: Tensor) -> Activations:
        """The rows ``idx [n]``: ``x`` = ``y`` ``[n_layers_kept, T, width]`` float32 (T: the
        rows' non-BOS tokens)."""
        wanted = [int(i) for i in idx]
        store = self._cache if self.cache_dtype is not None else {}
        todo = list(dict.fromkeys(i for i in wanted if i not in store))
        for b in range(0, len(todo), self.batch_rows):
            chunk = todo[b:b + self.batch_rows]
            ids = self.rows[chunk]
            x = self._run(ids)  # [L, B, ctx, width]
            keep = (ids != self.bos) if self.bos is not None else torch.ones_like(ids, dtype=torch.bool)
            for r, i in enumerate(chunk):
                store[i] = x[:, r, keep[r].to(x.device)].to("cpu", self.cache_dtype or torch.float32)
        x = torch.cat([store[i] for i in wanted], 1).float()
        return Activations(x, x)

    def _run(self, ids: Tensor) -> Tensor:
        last = (self.site, max(self.layers))

        def stop(_a: Tensor) -> Tensor:  # recorded before the edit runs: stop the pass there
            raise _Stop

        sites = [(self.site, L) for L in self.layers]
        with site_hooks(self.parts, record=sites, edit={last: stop}) as rec:
            try:
                self.body(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
        return torch.stack([rec[s] for s in sites])
