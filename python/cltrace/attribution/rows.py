"""Rows of the attribution matrix: the direct effects of every source on a batch of targets."""
from __future__ import annotations

import torch
from torch import Tensor

from ..frozen.model import EMBED, Seeds
from ..ops import attribution_contract
from ..replacement.state import ReplacementState


class EdgeRows:
    """Computes rows of direct effects for batches of seeds on one replacement state.

    Columns: [active features (state order), errors (layer-major), tokens].
    ``carry_prefix=True`` carries the positions without nodes through the backward too (every
    seed position allowed, at a little more cost); by default their tokens' edges come from
    the prefix paths."""

    def __init__(self, state: ReplacementState, carry_prefix: bool = False):
        self.state = state
        self.n_layers, self.n_pos = state.n_layers, state.n_pos
        tcs = state.transcoders
        counts = [a.feat_idx.numel() for a in state.acts]
        starts = [0] + torch.tensor(counts).cumsum(0).tolist()
        self.n_features = starts[-1]
        self.feature_cols = {S: slice(starts[S], starts[S + 1]) for S in range(self.n_layers)}
        # the positions without nodes are not carried by the backward (causal models): their
        # tokens' edges come from the prefix paths (FrozenLinearModel.prefix_paths)
        # (every seed lies at or after them: features exist only there, logits at the last)
        skip = state.skip_positions
        self.start = skip if state.frozen.causal and skip < state.n_pos and not carry_prefix else 0
        self.prefix = state.frozen.prefix_paths(state.embed[:self.start]) if self.start else None
        # positions of each layer's entries (all >= start: no features before it), as rows of
        # the backward's gradients
        self.rows_of = [a.rows() - self.start for a in state.acts]
        # entries are sorted by position: n_entries_before[S][p] = entries at positions < p
        self.n_entries_before = [a.row_offsets.tolist() for a in state.acts]
        self.writers = {L: [S for S in tcs.sources_writing_to(L) if counts[S]] for L in range(self.n_layers)}
        self.error_start = self.n_features
        self.token_start = self.n_features + self.n_layers * self.n_pos
        self.n_cols = self.token_start + self.n_pos

    def __call__(self, seeds: Seeds, at_resid: bool = False) -> Tensor:
        """[B, n_cols] direct effects of every source on each seed's target (``at_resid``:
        seeds on the residual streams, :meth:`FrozenLinearModel.iter_backward_live`).

        The backward runs on the live part only (:meth:`FrozenLinearModel.iter_backward_live`:
        seeds above each layer, positions up to the last seed's), so the contractions touch
        only those rows and the features at those positions; the rest of ``out`` is zero."""
        st, B = self.state, seeds.n
        order = seeds.layer.argsort(descending=True, stable=True)  # highest layer first
        out = torch.zeros(B, self.n_cols, dtype=st.frozen.dtype, device=st.tokens.device)
        for step in st.frozen.iter_backward_live(Seeds(*(t[order] for t in seeds)), self.prefix, at_resid):
            g = step.grad  # [k, n - start, d_model]: the live seeds' gradients at positions start..n-1
            k, n = g.shape[0], self.start + g.shape[1]
            if k == 0:
                continue
            if step.layer == EMBED:
                tok = slice(self.token_start + self.start, self.token_start + n)
                out[:k, tok] = torch.einsum("bpd,pd->bp", g, st.embed[self.start:n].to(g.dtype))
                if step.prefix is not None:
                    out[:k, self.token_start:self.token_start + self.start] = step.prefix[:k]
                continue
            L = step.layer
            for S in self.writers[L]:
                a, m = st.acts[S], self.n_entries_before[S][n]  # entries at positions < n
                W = st.transcoders.decoder_slice(S, L)  # [d_sae, d_model], rows strided for a CLT
                cols = slice(self.feature_cols[S].start, self.feature_cols[S].start + m)
                out[:k, cols] += attribution_contract(g, self.rows_of[S][:m], W, a.feat_idx[:m], a.acts[:m])
            err = slice(self.error_start + L * self.n_pos + self.start, self.error_start + L * self.n_pos + n)
            out[:k, err] = torch.einsum("bpd,pd->bp", g, st.errors[L][self.start:n].to(g.dtype))
        if not bool(torch.isfinite(out).all()):
            b = int((~torch.isfinite(out)).any(1).nonzero()[0])
            raise ValueError(f"non-finite edges (NaN or inf) in the row of the target at layer "
                             f"{int(seeds.layer[order[b]])}, position {int(seeds.pos[order[b]])}: "
                             "the weights it reads hold NaN/inf")
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted
