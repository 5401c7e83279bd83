"""MLP activations of a model on batches of token rows, at the Gemma Scope 2 hook points.

:class:`ActivationSource` runs the model on a batch of rows and records, per layer, the MLP
input (``pre_feedforward_layernorm`` output) and output (``post_feedforward_layernorm``
output); BOS positions are dropped (their activations are outliers that no transcoder should
fit). It stops after the last layer asked for (no unembedding); with ``outputs=False`` it records
only the MLP inputs and stops before the last layer's MLP (what an encoder needs). Reading is deterministic:
rows are addressed by index, so a resumed run reads the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Activations:
    """MLP inputs and outputs of some layers on a batch of tokens (BOS positions dropped)."""

    x: Tensor  # [n_layers_kept, T, d_model]  pre_feedforward_layernorm output (transcoder input)
    y: Optional[Tensor]  # [n_layers_kept, T, d_model]  post_feedforward_layernorm output (target);
    #                      None when the source was made with outputs=False


class _Stop(Exception):
    pass


class ActivationSource:
    """MLP activations of ``model`` on token ``rows [n_rows, ctx]``, read by row index.

    ``read(idx)`` runs the rows ``idx [n]`` through the decoder stack only (no unembedding;
    it stops after the last layer needed)."""

    def __init__(self, model, rows: Tensor, layers: Sequence[int], bos_token_id: Optional[int],
                 batch_rows: int = 8, cache_dtype: Optional[torch.dtype] = None,
                 outputs: bool = True):
        from .anatomy import text_parts

        self.parts = text_parts(model)
        self.rows, self.layers, self.bos = rows, list(layers), bos_token_id
        self.batch_rows = batch_rows
        self.outputs = outputs  # False: MLP inputs only (y is None), one MLP less per read
        self.device = self.parts.lm_head.weight.device
        inner = getattr(model, "model", None)
        self.body = getattr(inner, "language_model", inner)  # the decoder stack
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
        return sum(x.nbytes + y.nbytes for x, y in self._cache.values())

    @torch.no_grad()
    def read(self, idx: Tensor) -> Activations:
        """Activations of the rows ``idx [n]``: ``x, y [n_layers_kept, T, d_model]`` float32."""
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
                store[i] = (x[:, r, k].to("cpu", dt), None if y is None else y[:, r, k].to("cpu", dt))
        xs = [store[i][0] for i in wanted]
        if not self.outputs:
            return Activations(torch.cat(xs, 1).float(), None)
        ys = [store[i][1] for i in wanted]
        return Activations(torch.cat(xs, 1).float(), torch.cat(ys, 1).float())

    def _run(self, ids: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        rec: dict[tuple[str, int], Tensor] = {}
        last = max(self.layers)
        handles = []

        def hook(kind: str, L: int):
            def fn(_mod, _args, out):
                rec[(kind, L)] = (out[0] if isinstance(out, tuple) else out).detach()
                if L == last and (kind == "y" or not self.outputs):
                    raise _Stop
            return fn

        try:
            for L in self.layers:
                layer = self.parts.layers[L]
                handles.append(layer.pre_feedforward_layernorm.register_forward_hook(hook("x", L)))
                if self.outputs:
                    handles.append(layer.post_feedforward_layernorm.register_forward_hook(hook("y", L)))
            try:
                self.body(input_ids=ids.to(self.device), use_cache=False)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        x = torch.stack([rec[("x", L)] for L in self.layers])
        return x, (torch.stack([rec[("y", L)] for L in self.layers]) if self.outputs else None)
