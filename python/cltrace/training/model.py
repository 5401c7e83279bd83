"""Trainable JumpReLU transcoders (per-layer or cross-layer) or SAEs, and their training loss.

An SAE (``TrainConfig.site``) is the per-layer case whose input and target are the same
activation, the one at that site: same weights, loss and controller, no skip.

The recipe follows Gemma Scope 2 (and the JumpReLU SAE paper, Rajamanoharan et al. 2024,
https://arxiv.org/abs/2407.14435):

* features ``f = z * H(z - theta)``, ``z = x @ W_enc + b_enc``; ``theta = exp(log_threshold)``;
* reconstruction of layer L's MLP output ``sum_{S<=L} f_S @ W_dec_S[:, L-S] + b_dec_L
  (+ x_L @ W_skip_L)``;
* loss ``= MSE + l0_coef * (L0 / l0_target - 1)^2 + freq_coef * sum_i relu(p_i - max_freq)``,
  where the L0 and the firing frequencies ``p_i`` count ``H(z - theta)``; the step function's
  gradient reaches theta through the rectangle straight-through estimator of width
  ``bandwidth`` (pseudo-derivative ``-K((z - theta)/eps) / eps``; JumpReLU's own is
  ``-theta K(...) / eps``), never z;
* the L0 controller (``l0_control="threshold"``, the default): after every optimizer step
  the optimizer's change of each source layer's mean log-threshold is undone and the level
  moves instead by ``l0_gain * log(L0_batch / l0_target)`` (clamped to a factor of 2 per
  step). The quadratic penalty alone loses to the reconstruction's straight-through pull on
  the thresholds (L0 ends far below target in short runs); with the level owned by an
  integral controller that has no drift to fight, the measured L0 settles on the target,
  while the gradients still decide which features fire (the relative thresholds);
* Matryoshka (``matryoshka=[m_1, ..., m_k]``, Gemma Scope 2's recipe; Bussmann et al. 2025,
  https://arxiv.org/abs/2503.17547): the reconstruction loss is the mean over the nested
  prefixes ``m_1 < ... < m_k < width`` and the full width of the MSE of the reconstruction
  that uses only features ``< m`` (skip and biases always included), so every prefix of the
  dictionary is itself a transcoder.

Inputs and targets are normalised per layer (``x * x_scale`` with mean squared norm
``d_model``, ``y * y_scale`` with mean squared norm 1) and the scales are folded back into
the weights on export, so the written transcoders read raw activations.

Two backends compute the same step: ``"sparse"`` uses the compiled ops (``jumprelu_encode``
with its sparse straight-through backward and ``sparse_decode``), ``"dense"`` is plain torch
autograd over the dense ``[B, d_sae]`` activations (the benchmark's baseline and a test oracle).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import UsageError
from ..models.sites import SAE_SITES
from ..settings import option, parse_layers, parse_sizes
from ..transcoders.base import LayerTranscoder, TranscoderSet


@dataclass
class TrainConfig:
    """What to train and how: the one source of these defaults, for :func:`cltrace.training.train_transcoders`
    and ``cltrace train``'s options (made from the :func:`~cltrace.settings.option` fields);
    saved in checkpoints and in the written set's info."""

    kind: str = option("plt", "per-layer (plt) or cross-layer (clt: source S writes to S..n-1) "
                       "transcoders", choices=("plt", "clt"))
    site: Optional[str] = option(
        None, "train SAEs instead: read and reconstruct the activation at this site "
        "(resid_post, attn_out, mlp_out; per layer, no skip); none: transcoders MLP input -> "
        "MLP output", metavar="SITE", type=str, choices=SAE_SITES)
    affine_skip: bool = option(False, "learn an affine skip connection x @ W_skip")
    width: int = option(4096, "features per layer (d_sae)", metavar="W")
    l0: float = option(32.0, "target active features per token, per source layer", metavar="TARGET")
    tokens: int = option(200_000, "training tokens (each step uses --batch-size of them)", metavar="N")
    corpus_tokens: Optional[int] = option(
        None, "distinct training tokens (none: N); M < N makes several passes over the same text",
        metavar="M", type=int, default_text="N")
    cache_activations: bool = option(False, "keep activations in memory (bf16) so later passes "
                                     "skip the model")
    batch_size: int = option(1024, "tokens per step", metavar="B")
    lr: float = option(2e-4, "Adam learning rate of the matrices (W_enc, W_dec, W_skip); linear "
                       "warmup, then linear decay over the last decay_frac; thresholds and biases "
                       "use vec_lr_mult times it")
    vec_lr_mult: float = 10.0  # thresholds and biases learn this much faster (short runs)
    warmup_steps: int = 50
    decay_frac: float = 0.3
    seed: int = option(0, "seed of the initialisation and the batch order")
    layers: Optional[list[int]] = option(None, "source layers, e.g. 0-5,9 (none: all; a CLT needs "
                                         "all)", metavar="LIST", type=parse_layers, default_text="all")
    bandwidth: float = option(0.1, "straight-through estimator's rectangle width, in normalised "
                              "pre-activation units", metavar="X")
    l0_coef: float = option(1.0, "weight of the L0 penalty", metavar="X")
    l0_control: str = option("threshold", "keep the L0 on target by moving the thresholds "
                             "(threshold), or not (none)", choices=("threshold", "none"))
    l0_gain: float = option(0.1, "L0 controller gain: log-threshold step per unit of log(L0 / target)", metavar="X")
    control_tokens: int = option(0, "hold the L0 of K corpus tokens never trained on (0: of each "
                                 "batch; use ~2048 when --corpus-tokens < --tokens)", metavar="K")
    matryoshka: Optional[list[int]] = option(
        None, "nested dictionary prefixes (< width) that also reconstruct, e.g. 256,512,1024",
        metavar="SIZES", type=parse_sizes)
    freq_coef: float = option(0.1, "weight of the penalty on features firing above --max-freq",
                              metavar="X")
    max_freq: float = option(0.1, "firing frequency (fraction of tokens) above which the "
                             "frequency penalty applies", metavar="X")
    buffer_tokens: int = option(8192, "activations read from the model at a time (all layers)",
                                metavar="N")
    ctx: int = option(128, "tokens per sequence (BOS + T - 1)", metavar="T")
    eval_tokens: int = 4096  # held-out tokens (never trained on) for the final FVU / L0
    dead_window: int = 50_000  # a feature is dead if it has not fired in this many tokens
    backend: str = "sparse"  # "sparse" (compiled ops) or "dense" (torch autograd)

    def check(self) -> None:
        if self.kind not in ("plt", "clt"):
            raise UsageError(f"kind must be 'plt' or 'clt', got {self.kind!r}")
        if self.site is not None:
            if self.site not in SAE_SITES:
                raise UsageError(f"--site must be one of {', '.join(SAE_SITES)}, got {self.site!r}")
            if self.kind != "plt" or self.affine_skip:
                raise UsageError(f"--site {self.site} trains one SAE per layer: it takes no "
                                 "--kind clt and no --affine-skip")
        if not 0 < self.l0 < self.width:
            raise UsageError(f"--l0 must be in (0, width={self.width}), got {self.l0}")
        if self.tokens < 1 or self.batch_size < 1 or self.buffer_tokens < self.batch_size:
            raise UsageError("need tokens >= 1, batch_size >= 1 and buffer_tokens >= batch_size")
        if self.backend not in ("sparse", "dense"):
            raise UsageError(f"backend must be 'sparse' or 'dense', got {self.backend!r}")
        if self.lr <= 0 or self.bandwidth <= 0:
            raise UsageError("lr and bandwidth must be > 0")
        if self.l0_control not in ("threshold", "none") or self.l0_gain < 0:
            raise UsageError(f"l0_control must be 'threshold' or 'none' (gain >= 0), got "
                             f"{self.l0_control!r}, {self.l0_gain}")
        if self.control_tokens < 0:
            raise UsageError(f"--control-tokens must be >= 0, got {self.control_tokens}")
        m = self.matryoshka or []
        if any(not a < b for a, b in zip([0, *m], [*m, self.width])):
            raise UsageError(f"--matryoshka prefixes must increase strictly within (0, width="
                             f"{self.width}), got {m}")

    @property
    def prefixes(self) -> list[int]:
        """The dictionary sizes whose reconstructions enter the loss (always ends with width)."""
        return [*(self.matryoshka or []), self.width]

    @property
    def total_steps(self) -> int:
        return -(-self.tokens // self.batch_size)


THRESHOLD_FLOOR = 1e-2  # mean threshold (normalised units) below which the L0 controller
# raises the encoder biases instead


class _Step(torch.autograd.Function):
    """H(z - theta) with the rectangle STE to theta only: d/dtheta = -K((z-theta)/eps)/eps."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        in_band = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        grad_theta = -g * in_band / ctx.eps
        return None, _sum_to(grad_theta, theta.shape), None


class _DenseJumpReLU(torch.autograd.Function):
    """z * H(z - theta): d/dz = H(z - theta), d/dtheta = -theta K((z-theta)/eps)/eps (STE)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        in_band = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        grad_theta = _sum_to(-g * in_band * theta / ctx.eps, theta.shape)
        return g * (z > theta), grad_theta, None


def _sum_to(t: Tensor, shape) -> Tensor:
    return t.sum(0) if t.dim() > len(shape) else t


@dataclass
class StepStats:
    """Per-layer statistics of one step (floats, for the progress bar and logs)."""

    loss: float
    mse: list[float]  # per target layer, normalised units
    fvu: list[float]  # per target layer
    l0: list[float]  # per source layer (features with z > theta, no band)
    fired: list[Tensor] = field(default_factory=list)  # per source layer: [d_sae] bool


class TranscoderParams(nn.Module):
    """The trainable weights of all source layers, in normalised units (``d_model``: the width
    of the activation read, the site's width for an SAE)."""

    def __init__(self, cfg: TrainConfig, layers: list[int], n_layers: int, d_model: int):
        super().__init__()
        self.cfg, self.layer_ids, self.n_layers = cfg, list(layers), n_layers
        W, d = cfg.width, d_model
        self.W_enc = nn.ParameterList()  # [d, W] each
        self.b_enc = nn.ParameterList()  # [W]
        self.log_threshold = nn.ParameterList()  # [W]
        self.W_dec = nn.ParameterList()  # [W, n_out, d]
        self.b_dec = nn.ParameterList()  # [d]
        self.W_skip = nn.ParameterList()  # [d, d] (affine only)
        for i, L in enumerate(self.layer_ids):
            n_out = 1 if cfg.kind == "plt" else len(self.layer_ids) - i
            self.W_enc.append(nn.Parameter(torch.zeros(d, W)))
            self.b_enc.append(nn.Parameter(torch.zeros(W)))
            self.log_threshold.append(nn.Parameter(torch.zeros(W)))
            self.W_dec.append(nn.Parameter(torch.zeros(W, n_out, d)))
            self.b_dec.append(nn.Parameter(torch.zeros(d)))
            if cfg.affine_skip:
                self.W_skip.append(nn.Parameter(torch.zeros(d, d)))
        self.l0_targets: Optional[list[float]] = None  # per source layer (None: cfg.l0 each)
        self.register_buffer("x_scale", torch.ones(len(layers)))
        self.register_buffer("y_scale", torch.ones(len(layers)))

    @torch.no_grad()
    def param_groups(self) -> list[dict]:
        """Adam groups: matrices at lr, thresholds and biases at lr * vec_lr_mult."""
        mats = [*self.W_enc, *self.W_dec, *self.W_skip]
        vecs = [*self.b_enc, *self.log_threshold, *self.b_dec]
        return [{"params": mats, "lr": self.cfg.lr},
                {"params": vecs, "lr": self.cfg.lr * self.cfg.vec_lr_mult}]

    @torch.no_grad()
    def initialize(self, x: Tensor, y: Tensor, gen: torch.Generator) -> None:
        """Data-dependent init from raw activations ``x, y [n_src, T, d]``: the normalising
        scales; random unit encoder columns with thresholds at the (1 - l0/width) quantile of
        each feature's pre-activation (so about l0 fire at first); zero decoders; b_dec (and
        the affine skip) a least-squares fit of the target."""
        d = x.shape[-1]
        self.x_scale.copy_((d / x.pow(2).sum(-1).mean(-1)).sqrt())
        self.y_scale.copy_((1.0 / y.pow(2).sum(-1).mean(-1).clamp_min(1e-12)).sqrt())
        xn, yn = x * self.x_scale[:, None, None], y * self.y_scale[:, None, None]
        q = 1.0 - self.cfg.l0 / self.cfg.width
        for i in range(len(self.layer_ids)):
            W = torch.randn(d, self.cfg.width, generator=gen)
            self.W_enc[i].copy_(W / W.norm(dim=0, keepdim=True))
            z = xn[i, :4096] @ self.W_enc[i]
            self.log_threshold[i].copy_(torch.quantile(z, q, dim=0).clamp_min(1e-2).log())
            if self.cfg.affine_skip:
                A = torch.cat([xn[i], torch.ones_like(xn[i, :, :1])], 1).double()
                gram = A.T @ A
                gram.diagonal().add_(1e-3 * gram.diagonal().mean())
                coef = torch.linalg.solve(gram, A.T @ yn[i].double()).float()  # [d + 1, d]
                self.W_skip[i].copy_(coef[:d])
                self.b_dec[i].copy_(coef[d])
            else:
                self.b_dec[i].copy_(yn[i].mean(0))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, StepStats]:
        """Loss on normalised ``x, y [n_src, B, d]`` (one row per source layer)."""
        return self.loss_and_recon(x, y)[:2]

    def loss_and_recon(self, x: Tensor, y: Tensor) -> tuple[Tensor, StepStats, list[Tensor]]:
        """(loss, stats, reconstruction of each target layer ``[B, d]`` in normalised units by
        the full dictionary, with gradients) on normalised ``x, y [n_src, B, d]``."""
        cfg, B = self.cfg, x.shape[1]
        eps, n_src, sizes = cfg.bandwidth, len(self.layer_ids), cfg.prefixes
        base = [self.b_dec[i].expand(B, -1) for i in range(n_src)]
        if cfg.affine_skip:
            base = [r + x[i] @ self.W_skip[i] for i, r in enumerate(base)]
        recon = [list(base) for _ in sizes]  # [prefix][target layer]
        sparsity = x.new_zeros(())
        l0s, fired = [], []
        for i in range(n_src):
            theta = self.log_threshold[i].exp()
            if cfg.backend == "sparse":
                sp = ops.jumprelu_encode(x[i], self.W_enc[i], self.b_enc[i], theta, eps)
                outs = [ops.sparse_decode(sp.row_offsets, sp.feat_idx,
                                          sp.acts if m == cfg.width else sp.acts * (sp.feat_idx < m),
                                          self.W_dec[i]) for m in sizes]
                on = _Step.apply(sp.pre_acts, theta[sp.feat_idx], eps)  # [nnz]
                counts = torch.zeros_like(theta).index_add(0, sp.feat_idx, on)  # [W]
            else:
                z = x[i] @ self.W_enc[i] + self.b_enc[i]  # [B, W]
                acts = _DenseJumpReLU.apply(z, theta, eps)
                outs = [torch.einsum("bf,fod->bod", acts[:, :m], self.W_dec[i][:m])
                        for m in sizes]  # [B, n_out, d] each
                counts = _Step.apply(z, theta, eps).sum(0)  # [W]
            for k, out in enumerate(outs):
                for o in range(out.shape[1]):
                    recon[k][i + o] = recon[k][i + o] + out[:, o]
            l0 = counts.sum() / B
            sparsity = sparsity + cfg.l0_coef * (l0 / self.l0_target(i) - 1).square()
            if cfg.freq_coef > 0:
                sparsity = sparsity + cfg.freq_coef * (counts / B - cfg.max_freq).relu().sum()
            l0s.append(float(l0.detach()))
            fired.append(counts.detach() > 0)
        errs = [[(r - y[i]).square().sum(-1).mean() for i, r in enumerate(rk)] for rk in recon]
        mse = torch.stack([torch.stack(e).sum() for e in errs]).mean()
        var = (y - y.mean(1, keepdim=True)).square().sum(-1).mean(-1)  # [n_src]
        loss = mse + sparsity
        err_f = [float(e.detach()) for e in errs[-1]]  # the full dictionary
        stats = StepStats(float(loss.detach()), err_f,
                          [e / max(float(v), 1e-12) for e, v in zip(err_f, var)], l0s, fired)
        return loss, stats, recon[-1]

    def l0_target(self, i: int) -> float:
        """The target L0 of source layer ``i`` (``cfg.l0`` unless ``l0_targets`` is set:
        fine-tuning holds each layer's own starting L0)."""
        return self.cfg.l0 if self.l0_targets is None else self.l0_targets[i]

    @torch.no_grad()
    def l0_of(self, x: Tensor) -> list[float]:
        """Exact L0 (features with z > theta, no band) of each source layer on normalised
        ``x [n_src, T, d]``."""
        return [float(((x[i] @ self.W_enc[i] + self.b_enc[i]) > self.log_threshold[i].exp())
                      .sum()) / x.shape[1] for i in range(len(self.layer_ids))]

    @torch.no_grad()
    def threshold_levels(self) -> list[tuple[float, float]]:
        """(mean log-threshold, mean encoder bias) of each source layer: the firing level the
        L0 controller owns."""
        return [(float(t.mean()), float(b.mean())) for t, b in zip(self.log_threshold, self.b_enc)]

    @torch.no_grad()
    def control_l0(self, l0s: list[float], levels_before: list[tuple[float, float]]) -> None:
        """The L0 controller, after an optimizer step: undo the step's change of each source
        layer's mean log-threshold (the gradients keep deciding the relative thresholds), then
        move it by ``l0_gain * log(L0 / target)`` (L0 of the step's batch; the ratio clamped
        to [1/2, 2]). An integral controller with no drift to fight: it settles on the target.
        Where the thresholds sit at :data:`THRESHOLD_FLOOR` (normalised units) the mean encoder
        bias is held and moved instead (lowering every bias is the optimizer's other way to
        fire less, which thresholds at the floor cannot answer)."""
        cfg = self.cfg
        if cfg.l0_control != "threshold":
            return
        for i, (l0, (log_t, b)) in enumerate(zip(l0s, levels_before)):
            step = cfg.l0_gain * math.log(min(max((l0 + 1e-3) / self.l0_target(i), 0.5), 2.0))
            self.log_threshold[i].sub_(float(self.log_threshold[i].mean()) - log_t)
            if log_t + min(step, 0.0) < math.log(THRESHOLD_FLOOR):
                # thresholds at the floor: the bias level is the controller's too, and moves
                self.b_enc[i].sub_(float(self.b_enc[i].mean()) - b + step)
            else:
                self.log_threshold[i].add_(step)

    @torch.no_grad()
    def to_transcoder_set(self, model_name: str = "", info: Optional[dict] = None) -> TranscoderSet:
        """The trained transcoders reading raw activations (normalising scales folded in)."""
        layers = {}
        for i, L in enumerate(self.layer_ids):
            sx = float(self.x_scale[i])
            sy = self.y_scale[i:i + self.W_dec[i].shape[1]]  # target layers' scales
            W_dec = self.W_dec[i].detach() / sy[None, :, None]
            W_skip = None
            if self.cfg.affine_skip:
                W_skip = (self.W_skip[i].detach() * (sx / float(self.y_scale[i]))).clone()
            layers[L] = LayerTranscoder(
                W_enc=(self.W_enc[i].detach() * sx).clone(), b_enc=self.b_enc[i].detach().clone(),
                threshold=self.log_threshold[i].detach().exp(), W_dec=W_dec.contiguous(),
                b_dec=(self.b_dec[i].detach() / float(self.y_scale[i])).clone(), W_skip=W_skip)
        site = {} if self.cfg.site is None else {"site_in": self.cfg.site, "site_out": self.cfg.site}
        return TranscoderSet(kind=self.cfg.kind, n_layers=self.n_layers, layers=layers,
                             model_name=model_name, info=dict(info or {}), **site)
