"""Starter transcoders for a model, so that ``cltrace attribute`` works with no download.

The default (:func:`starter_transcoders`) is a TRAINED set: on first use, per-layer JumpReLU
transcoders with an affine skip are trained on the model's own MLP activations over an
offline corpus (:func:`starter_corpus`): two thirds English text the model itself writes
from general openings, one third installed text (docstrings of installed Python files,
installed packages' long descriptions, the Python language reference), with the L0
controller holding the target L0 on corpus rows never trained on (:mod:`cltrace.training.loop`).
The set is written in the Gemma Scope 2 layout under ``cache_root()/starter/`` and reused
afterwards; an interrupted first run resumes from its checkpoint (the model-written texts are
kept beside the set, so a resumed run and the set's feature pages read the same corpus). Its
``info`` records the training and the held-out FVU and L0 per layer on held-out documents of
the corpus and on English prose that no training source contains (see
benchmarks/RESULTS_training.md for the measured figures and the first-run time). These are
small transcoders trained briefly: useful for trying the tool, not a substitute for Gemma
Scope 2.

:func:`fit_starter_set` builds the older SYNTHETIC kind of set (not trained) from MLP inputs and
outputs (:func:`collect_mlp_io`): random encoders; each feature's JumpReLU threshold is
calibrated on the model's real MLP inputs so that about ``l0`` features fire per token; the
affine skip and ``b_dec`` are a least-squares fit of the MLP output on its input, and the
decoders a ridge fit of what remains on the feature activations. Graphs on it are exact, but its
features carry no learned meaning (tests and benchmarks use it).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..models.activations import ActivationSource
from ..models.anatomy import text_parts
from ..transcoders.base import LayerTranscoder, TranscoderSet
from .corpus import stdlib_texts, token_rows
from .model import TrainConfig
from ..errors import UsageError

CALIBRATION_MODULES = ["json", "pathlib", "argparse", "collections", "functools", "itertools",
                       "re", "string", "textwrap", "datetime", "random", "statistics", "csv",
                       "logging", "shutil", "subprocess", "tempfile", "typing", "dataclasses", "heapq"]


def calibration_texts() -> list[str]:
    """The synthetic set's (short) calibration text: docstrings of a few standard-library
    modules (:func:`cltrace.training.corpus.stdlib_texts`)."""
    return stdlib_texts(CALIBRATION_MODULES)


@torch.no_grad()
def collect_mlp_io(model, tokenizer, n_tokens: int, chunk: int = 128) -> tuple[Tensor, Tensor]:
    """MLP inputs and outputs of every layer on ``n_tokens`` calibration tokens (BOS excluded),
    read by :class:`cltrace.models.activations.ActivationSource` from rows of ``chunk``
    tokens: ``[n_layers, n_tokens, d_model]`` each, float32."""
    rows = token_rows(tokenizer, calibration_texts(), chunk, max_tokens=n_tokens)
    n_layers = len(text_parts(model).layers)
    act = ActivationSource(model, rows, range(n_layers), tokenizer.bos_token_id).read(
        torch.arange(rows.shape[0]))
    return act.x[:, :n_tokens], act.y[:, :n_tokens]


def _ridge(A: Tensor, B: Tensor, lam: float) -> Tensor:
    """argmin_W |A W - B|² + lam·tr(A^T A)/n |W|²  (float64 solve)."""
    A, B = A.double(), B.double()
    gram = A.T @ A
    gram.diagonal().add_(lam * gram.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.solve(gram, A.T @ B).float()


def fit_starter_set(X: Tensor, Y: Tensor, *, kind: str = "plt", width: int = 4096, l0: int = 32,
                    affine: bool = True, seed: int = 0, model_name: str = "",
                    progress: Optional[Callable[[int], None]] = None) -> TranscoderSet:
    """Build the synthetic set from MLP inputs/outputs ``X, Y [n_layers, T, d_model]``."""
    if kind not in ("plt", "clt"):
        raise UsageError(f"kind must be 'plt' or 'clt', got {kind!r}")
    if not 0 < l0 < width:
        raise UsageError(f"l0 must be in (0, width={width}), got {l0}")
    n_layers, T, d = X.shape
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for L in range(n_layers):
        x, y = X[L], Y[L]
        W_enc = torch.randn(d, width, generator=g)
        W_enc /= W_enc.norm(dim=0, keepdim=True)
        z = x @ W_enc  # [T, width]
        threshold = torch.quantile(z, 1.0 - l0 / width, dim=0).clamp_min(1e-3)
        ones = torch.ones(T, 1)
        if affine:
            coef = _ridge(torch.cat([x, ones], 1), y, 1e-3)  # [d + 1, d]
            W_skip, b_dec = coef[:d], coef[d]
        else:
            W_skip, b_dec = None, y.mean(0)
        rest = y - b_dec - (x @ W_skip if W_skip is not None else 0)
        acts = z * (z > threshold)
        n_out = 1 if kind == "plt" else n_layers - L
        W_dec = 0.01 * torch.randn(width, n_out, d, generator=g) / width ** 0.5
        W_dec[:, 0] = _ridge(acts, rest, 1e-2)
        layers[L] = LayerTranscoder(W_enc, torch.zeros(width), threshold, W_dec, b_dec, W_skip)
        if progress:
            progress(L + 1)
    info = {"synthetic": True, "trained": False,
            "description": ("SYNTHETIC, NOT TRAINED: random encoders, thresholds calibrated on "
                            f"{T} real tokens for L0~{l0}, skip/decoders fitted by least squares")}
    return TranscoderSet(kind=kind, n_layers=n_layers, layers=layers, model_name=model_name,
                         source="", info={**info, "graph_info": {"transcoders": info["description"]}})


# The trained starter set (recipe v3; figures in benchmarks/RESULTS_training.md): PLT + affine
# skip, width 2048, target L0 32 held by the L0 controller on 2,048 corpus tokens never trained
# on, 256 steps of 512 tokens over STARTER_CONFIG.corpus_tokens distinct tokens (activations
# cached in memory as bf16): about 2/3 English the model writes itself (STARTER_GENERATED texts),
# 1/3 installed text (STARTER_INSTALLED_TOKENS tokens of the corpus.STARTER_MIX).
STARTER_CONFIG = TrainConfig(kind="plt", affine_skip=True, width=2048, l0=32, tokens=131_072,
                             corpus_tokens=48_000, cache_activations=True, batch_size=512,
                             lr=4e-4, vec_lr_mult=10, warmup_steps=10, buffer_tokens=8192,
                             eval_tokens=4096, l0_control="threshold", l0_gain=0.1,
                             control_tokens=2048)
STARTER_GENERATED = 320  # model-written texts of STARTER_GENERATED_TOKENS tokens in the mix
STARTER_GENERATED_TOKENS = 96
STARTER_GENERATION_BATCH = 160
STARTER_INSTALLED_TOKENS = 16_000  # tokens drawn from the installed texts (docstrings, ...)
STARTER_VERSION = 3  # bump when the recipe changes (a new cache entry is trained)


def starter_tag(loaded, cfg: Optional[TrainConfig] = None) -> str:
    """The cache name of a model's trained starter set (recipe and version in it)."""
    cfg = cfg or STARTER_CONFIG
    name = getattr(loaded, "name", "") or "model"
    return (f"{_safe(name)}-trained-{cfg.kind}-w{cfg.width}-l0_{cfg.l0:g}"
            f"{'-affine' if cfg.affine_skip else ''}{'-mat' if cfg.matryoshka else ''}"
            f"-t{cfg.tokens}-v{STARTER_VERSION}")


def starter_corpus(loaded, tag: str, *, progress=print, bar: bool = True):
    """The starter set's corpus (:class:`cltrace.training.corpus.Corpus`): the model-written
    texts (written once, kept beside the set as ``{tag}.generated.json``) mixed with
    STARTER_INSTALLED_TOKENS tokens of installed text. The set is trained on its ``train``
    documents and its feature pages are built over them."""
    from ..models import cache_root
    from .corpus import CHARS_PER_TOKEN, mixed_corpus

    path = cache_root() / "starter" / f"{tag}.generated.json"
    key = (str(path), STARTER_INSTALLED_TOKENS)
    if key not in _CORPORA:  # a first run asks twice (training, then pages): walk the files once
        generated = _generated(loaded, path, progress, bar)
        _CORPORA[key] = mixed_corpus(CHARS_PER_TOKEN * STARTER_INSTALLED_TOKENS, generated=generated)
    return _CORPORA[key]


_CORPORA: dict = {}  # (written-texts file, installed tokens) -> Corpus, for this process


def starter_transcoders(loaded, *, config: Optional[TrainConfig] = None, progress=print,
                        bar: bool = True) -> TranscoderSet:
    """The cached TRAINED starter set of a loaded model (trained on first use, then reused).

    Cached in the Gemma Scope 2 layout under ``cache_root()/starter/`` and loaded back lazily;
    ``progress`` receives messages (the per-layer FVU and L0 among them)."""
    from ..models import cache_root
    from .corpus import heldout_prose
    from . import train_transcoders
    from ..transcoders import load_transcoders

    cfg = config or STARTER_CONFIG
    tag = starter_tag(loaded, cfg)
    folder = cache_root() / "starter" / tag
    if not folder.exists():
        progress(f"training the starter transcoders {tag} on this machine (first run only; "
                 f"cached in {folder}; Ctrl-C and rerun resumes) ...")
        corpus = starter_corpus(loaded, tag, progress=progress, bar=bar)
        evals = {"held-out mix": corpus.heldout, "held-out prose": heldout_prose()}
        try:
            train_transcoders(loaded, cfg, corpus.train, eval_texts=evals, out=folder,
                              resume=True, corpus_name=corpus.name, log=progress, bar=bar)
        except FileExistsError:
            if not folder.exists():  # not another process finishing first
                raise
    ts = load_transcoders(folder)
    info = ts.info
    info["set_id"] = f"cltrace-starter/{tag}"
    progress(f"starter transcoders: {info.get('description', tag)}")
    return ts


def _generated(loaded, path, progress, bar: bool) -> list[str]:
    """The starter corpus's model-written texts: read from ``path`` when an earlier run wrote
    them, else written by the model (a progress bar per text) and saved there."""
    import json

    from ..atomic import atomic_write_text
    from .corpus import generated_texts

    if not STARTER_GENERATED:
        return []
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    progress(f"the model writes {STARTER_GENERATED} texts of {STARTER_GENERATED_TOKENS} tokens "
             "for the corpus ...")
    tq = None
    if bar:
        from tqdm import tqdm

        tq = tqdm(total=STARTER_GENERATED, unit="text", desc="writing", dynamic_ncols=True)
    try:
        texts = generated_texts(loaded.model, loaded.tokenizer, STARTER_GENERATED,
                                new_tokens=STARTER_GENERATED_TOKENS, seed=1,
                                batch=STARTER_GENERATION_BATCH,
                                progress=(lambda n: tq.update(n - tq.n)) if tq else None)
    finally:
        if tq is not None:
            tq.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(texts))
    return texts


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))[-64:]
