"""The training loop: activation buffers, Adam steps, progress, checkpoints and evaluation.

Activations of all trained layers are read from the model ``buffer_tokens`` at a time (one
model pass feeds every layer), shuffled with a seeded generator and consumed in batches;
every token is used once per pass over the corpus. The final FVU and L0 per layer are
measured on the exported weights on held-out text never trained on: the named evaluation
sources when given (e.g. held-out training-like text and English prose), else the last rows
of the corpus. With ``control_tokens``, rows before those are the L0 control set: never
trained on, their L0 is what the controller holds (:meth:`Trainer.control_l0s`).

Checkpoints are single files written to a temporary name and renamed (atomic). They hold the
weights, Adam and scheduler state, the shuffle generator's state at the start of the current
buffer, the data position (first row of the buffer, batches already taken from it) and the
step counters, so a resumed run continues exactly where the interrupted one stopped: it
re-reads the same buffer, redraws the same permutation and skips the batches already done.
Ctrl-C writes a checkpoint after the step in progress, then stops.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import ops
from ..evaluation.metrics import FVUSums
from ..transcoders.base import TranscoderSet
from .model import StepStats, TrainConfig, TranscoderParams
from ..errors import UsageError

CHECKPOINT_VERSION = 2


@dataclass
class EvalResult:
    """FVU per target layer and L0 per source layer of a set on one held-out text."""

    fvu: dict[int, float]
    l0: dict[int, float]
    tokens: int

    @property
    def fvu_mean(self) -> float:
        return sum(self.fvu.values()) / max(len(self.fvu), 1)

    @property
    def l0_mean(self) -> float:
        return sum(self.l0.values()) / max(len(self.l0), 1)


@dataclass
class TrainResult:
    """A finished run: the transcoders (raw units) and what was measured."""

    transcoders: TranscoderSet
    steps: int
    tokens: int  # training tokens consumed
    train_seconds: float  # wall time of the run (activations + steps), this process only
    fvu: dict[int, float]  # held-out fraction of variance unexplained, per layer
    l0: dict[int, float]  # held-out mean active features per token, per source layer
    dead_frac: dict[int, float]  # features not fired in the last dead_window training tokens
    eval_tokens: int
    evals: dict[str, EvalResult] = dataclasses.field(default_factory=dict)  # name -> result;
    # fvu / l0 / eval_tokens above repeat the first of them


class Trainer:
    """Trains transcoders on an activation source (``read(idx) -> Activations``,
    ``n_rows``, ``tokens_per_row``; see :class:`cltrace.models.activations.ActivationSource`)."""

    def __init__(self, cfg: TrainConfig, source, n_layers: int, d_model: int,
                 model_name: str = "", log: Callable[[str], None] = print, bar: bool = True,
                 eval_sources: Optional[dict[str, object]] = None):
        cfg.check()
        layers = list(range(n_layers)) if cfg.layers is None else sorted(set(cfg.layers))
        if cfg.kind == "clt" and layers != list(range(n_layers)):
            raise UsageError("a cross-layer transcoder is trained on all layers (omit --layers)")
        if not layers or not all(0 <= L < n_layers for L in layers):
            raise UsageError(f"--layers must lie in 0..{n_layers - 1}, got {cfg.layers}")
        self.cfg, self.source, self.layers = cfg, source, layers
        self.model_name, self.log, self.bar = model_name, log, bar
        self.eval_sources = dict(eval_sources or {})  # given: every corpus row is trained on
        self.n_eval_rows = 0 if self.eval_sources else min(
            -(-cfg.eval_tokens // source.tokens_per_row), source.n_rows // 4)
        # rows [0, n_train) are trained on, [n_train, n_train + n_control) hold the L0 control
        # set, the last n_eval_rows the held-out evaluation (when no eval_sources are given)
        self.n_control_rows = -(-cfg.control_tokens // source.tokens_per_row)
        self.n_train_rows = source.n_rows - self.n_eval_rows - self.n_control_rows
        if self.n_train_rows < 1:
            raise UsageError("the corpus is too short to train on")
        self.rows_per_buffer = max(1, cfg.buffer_tokens // source.tokens_per_row)
        self.params = TranscoderParams(cfg, layers, n_layers, d_model)
        self.opt = torch.optim.Adam(self.params.param_groups(), lr=cfg.lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = self.tokens_seen = self.row_pos = self.buffer_step = 0
        self.initialized = False
        self.buffer_gen_state: Optional[Tensor] = None
        self.last_fired = torch.zeros(len(layers), cfg.width, dtype=torch.int64)
        self.elapsed = 0.0
        self._buffer: Optional[tuple[Tensor, Tensor, Tensor]] = None  # x, y, perm
        self._control_x: Optional[Tensor] = None  # [n_src, T_control, d] raw, bf16
        self.stats: Optional[StepStats] = None
        self._stop = False

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        decay_start = cfg.total_steps * (1 - cfg.decay_frac)
        if step < decay_start:
            return warm
        return warm * max(0.0, (cfg.total_steps - step) / max(1.0, cfg.total_steps - decay_start))

    # --- data -------------------------------------------------------------------------------

    def _load_buffer(self) -> None:
        idx = (self.row_pos + torch.arange(self.rows_per_buffer)) % self.n_train_rows
        act = self.source.read(idx)
        if not self.initialized:
            self.params.initialize(act.x, act.y, self.gen)
            self.initialized = True
        if self.buffer_gen_state is None:
            self.buffer_gen_state = self.gen.get_state()
        else:
            self.gen.set_state(self.buffer_gen_state)
        p = self.params
        if act.x.shape[1] < self.cfg.batch_size:
            raise UsageError(f"a buffer holds {act.x.shape[1]} tokens, fewer than the batch size "
                             f"{self.cfg.batch_size}: raise buffer_tokens")
        x = act.x * p.x_scale[:, None, None]  # [n_src, T, d]
        y = act.y * p.y_scale[:, None, None]
        self._buffer = (x, y, torch.randperm(x.shape[1], generator=self.gen))

    def _next_buffer(self) -> None:
        self.row_pos += self.rows_per_buffer
        self.buffer_step, self._buffer, self.buffer_gen_state = 0, None, None

    # --- training ---------------------------------------------------------------------------

    def train_step(self, x: Tensor, y: Tensor) -> StepStats:
        """One Adam step on normalised ``x, y [n_src, B, d]``."""
        self.opt.zero_grad(set_to_none=True)
        loss, stats = self.params(x, y)
        loss.backward()
        levels = self.params.threshold_levels()
        self.opt.step()
        self.sched.step()
        self.params.control_l0(self.control_l0s(stats.l0), levels)
        return stats

    CONTROL_ROWS_PER_STEP = 2

    def control_l0s(self, batch_l0s: list[float]) -> list[float]:
        """The L0 per source layer that the controller holds at the target.

        Without a control set, the L0 of the training batch (measured before the step). With
        ``cfg.control_tokens``, the exact L0 of the current weights on
        :attr:`CONTROL_ROWS_PER_STEP` rows of the control set (rows never trained on, taken in
        turn): on a corpus seen more than once, a batch already trained on fires fewer features
        than unseen text does (the encoder learns to silence the features that hurt those very
        tokens), so a controller on the batches lowers the thresholds until unseen text — the
        held-out evaluation, a user's prompt — fires several times the target."""
        if not self.n_control_rows:
            return batch_l0s
        if self._control_x is None:  # read once (bf16: 18 layers x 2k tokens = 47 MB)
            idx = self.n_train_rows + torch.arange(self.n_control_rows)
            self._control_x = self.source.read(idx).x.to(torch.bfloat16)  # [n_src, T, d]
        T = self._control_x.shape[1]
        k = min(self.CONTROL_ROWS_PER_STEP * self.source.tokens_per_row, T)
        take = (self.step * k + torch.arange(k)) % T
        x = self._control_x[:, take].float() * self.params.x_scale[:, None, None]
        return self.params.l0_of(x)

    def run(self, checkpoint: Optional[os.PathLike] = None, checkpoint_every: float = 120.0,
            max_steps: Optional[int] = None) -> None:
        """Train until ``cfg.total_steps`` (or ``max_steps`` more steps: for tests)."""
        cfg, B = self.cfg, self.cfg.batch_size
        end = cfg.total_steps if max_steps is None else min(cfg.total_steps, self.step + max_steps)
        t_last_ckpt = time.perf_counter()
        bar = _bar(cfg.total_steps, self.step, self.bar)
        with _catch_sigint(self):
            while self.step < end:
                t0 = time.perf_counter()
                if self._buffer is None:
                    self._load_buffer()
                x, y, perm = self._buffer
                if (self.buffer_step + 1) * B > x.shape[1]:  # buffer used up (remainder dropped)
                    self._next_buffer()
                    self.elapsed += time.perf_counter() - t0
                    continue
                idx = perm[self.buffer_step * B:(self.buffer_step + 1) * B]
                self.stats = self.train_step(x[:, idx], y[:, idx])
                self.step += 1
                self.buffer_step += 1
                self.tokens_seen += B
                for i, f in enumerate(self.stats.fired):
                    self.last_fired[i][f] = self.tokens_seen
                self.elapsed += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(self.postfix(), refresh=False)
                if checkpoint is not None and (self._stop or time.perf_counter() - t_last_ckpt
                                               > checkpoint_every):
                    self.save_checkpoint(checkpoint)
                    t_last_ckpt = time.perf_counter()
                if self._stop:
                    if bar is not None:
                        bar.close()
                    raise KeyboardInterrupt(f"interrupted at step {self.step}"
                                            + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        if bar is not None:
            bar.close()

    def dead_fraction(self) -> list[float]:
        if self.tokens_seen < self.cfg.dead_window:
            return [float((lf == 0).float().mean()) for lf in self.last_fired]
        gap = self.tokens_seen - self.last_fired
        return [float((g >= self.cfg.dead_window).float().mean()) for g in gap]

    def postfix(self) -> str:
        s = self.stats
        n = len(s.fvu)
        return (f"loss {s.loss:.3f} fvu {sum(s.fvu) / n:.3f} l0 {sum(s.l0) / len(s.l0):.1f} "
                f"dead {sum(self.dead_fraction()) / len(self.layers):.1%}")

    # --- checkpoints ------------------------------------------------------------------------

    def state(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "config": dataclasses.asdict(self.cfg),
                "layers": self.layers, "step": self.step, "tokens_seen": self.tokens_seen,
                "row_pos": self.row_pos, "buffer_step": self.buffer_step,
                "buffer_gen_state": self.buffer_gen_state, "gen_state": self.gen.get_state(),
                "initialized": self.initialized, "params": self.params.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "last_fired": self.last_fired, "elapsed": self.elapsed,
                "torch_rng": torch.get_rng_state(), "rows": getattr(self.source, "rows", None)}

    def save_checkpoint(self, path: os.PathLike) -> Path:
        """Write the full training state to ``path`` atomically (temporary file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state(), f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def load_state(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise UsageError(f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        saved = TrainConfig(**state["config"])
        if dataclasses.replace(saved, backend=self.cfg.backend) != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in dataclasses.asdict(saved).items()
                    if getattr(self.cfg, k) != v and k != "backend"}
            raise UsageError(f"the checkpoint was made with other settings (saved, now): {diff}")
        self.params.load_state_dict(state["params"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        for k in ("step", "tokens_seen", "row_pos", "buffer_step", "buffer_gen_state",
                  "initialized", "last_fired", "elapsed"):
            setattr(self, k, state[k])
        self.gen.set_state(state["gen_state"])
        torch.set_rng_state(state["torch_rng"])
        self._buffer = None

    def resume(self, path: os.PathLike) -> None:
        """Restore the state saved by :meth:`save_checkpoint`."""
        self.load_state(torch.load(path, map_location="cpu", weights_only=False))

    # --- results ----------------------------------------------------------------------------

    def result(self, info: Optional[dict] = None) -> TrainResult:
        """Export (scales folded in) and evaluate on the held-out rows."""
        ts = self.params.to_transcoder_set(self.model_name, info)
        sources = self.eval_sources or {"held-out rows": self.source}
        evals = {}
        for name, src in sources.items():
            start = src.n_rows - self.n_eval_rows if src is self.source else 0
            idx = torch.arange(start, src.n_rows)
            evals[name] = EvalResult(*evaluate(ts, src, idx)) if idx.numel() else EvalResult({}, {}, 0)
        first = next(iter(evals.values()))
        dead = dict(zip(self.layers, self.dead_fraction()))
        return TrainResult(ts, self.step, self.tokens_seen, self.elapsed, first.fvu, first.l0,
                           dead, first.tokens, evals)


@torch.no_grad()
def evaluate(ts: TranscoderSet, source, idx: Tensor, chunk_rows: int = 16,
             prefix: Optional[int] = None):
    """FVU per target layer and L0 per source layer of ``ts`` (raw units, exact JumpReLU) on
    the rows ``idx`` of ``source``: ``({layer: fvu}, {layer: l0}, n_tokens)``. With ``prefix``
    only features ``< prefix`` take part (a Matryoshka prefix of the dictionary)."""
    layers = sorted(ts.layers)
    sums = {L: FVUSums() for L in layers}  # the FVU as cltrace.evaluation defines it
    nnz = {L: 0 for L in layers}
    n = 0
    for c in range(0, idx.numel(), chunk_rows):
        act = source.read(idx[c:c + chunk_rows])
        recon = {L: ts.layers[L].b_dec.expand(act.x.shape[1], -1).clone() for L in layers}
        for i, L in enumerate(layers):
            tc = ts.layers[L]
            x = act.x[i]
            sp = ops.jumprelu_encode(x, tc.W_enc, tc.b_enc, tc.threshold)
            acts = sp.acts if prefix is None else sp.acts * (sp.feat_idx < prefix)
            out = ops.sparse_decode(sp.row_offsets, sp.feat_idx, acts, tc.W_dec)
            for o in range(out.shape[1]):
                recon[layers[i + o]] += out[:, o]
            if tc.W_skip is not None:
                recon[L] += x @ tc.W_skip
            nnz[L] += int((acts != 0).sum())
        for i, L in enumerate(layers):
            sums[L].add(recon[L], act.y[i])
        n += act.x.shape[1]
    fvu = {L: sums[L].value for L in layers}
    return fvu, {L: nnz[L] / max(n, 1) for L in layers}, n


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                desc="training")


@contextlib.contextmanager
def _catch_sigint(trainer: Trainer):
    """Ctrl-C sets a flag the loop checks after each step (then checkpoints and stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig, _frame):
        if trainer._stop:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        trainer._stop = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        trainer._stop = False
