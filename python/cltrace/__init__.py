"""cltrace: attribution graphs (circuit tracing) for Gemma 3 with Gemma Scope 2 transcoders.

The pipeline, one package per stage (each imports only the stages before it)::

    models        load Gemma 3, its anatomy, batched MLP activations, the chat turn
    transcoders   transcoder sets: formats, validation, writing
    frozen        one recorded forward pass and the frozen linear model (forward, VJP, JVP)
    evaluation    how good a dictionary is on a corpus: FVU, L0, dead/dense, spliced loss
    replacement   transcoder features, reconstructions and errors of one prompt
    attribution   logit targets, rows of direct effects, the visit of the features -> Graph
    graph         the Graph as data: influence, pruning, scores, relevance
    export        Neuronpedia / circuit-tracer JSON, SVG (pure Python), Graphviz DOT/PNG
    steering      interventions (frozen or free mode) and steered generation
    training      corpora, the training loop, the starter sets
    attention     head loadings of edges and QK attribution of heads' scores (--qk)
    features      feature pages and automatic labels from a corpus (any transcoder set)
    pipeline      one prompt end to end (attribute, prune, score, export): trace_prompt
    batch         many prompts, local worker processes or a Ray cluster
    serve         the offline viewer (cltrace serve, cltrace.show in notebooks)
    commands      the command line (cltrace <command>)

Settings: one frozen dataclass per job holds its defaults (``AttributionSettings``,
``PruneSettings``, ``TrainConfig``, ``TraceSettings``); the command-line options are made
from it (:mod:`cltrace.settings`). Bad input raises :class:`cltrace.errors.UsageError`.

The compiled core (``cltrace._C``) provides the sparse kernels (:mod:`cltrace.ops`, with a
pure-torch twin of every op in :mod:`cltrace.reference`). ``import cltrace`` is cheap: the
names below are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, NamedTuple

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first access)
_LAZY = {
    "load_model": "cltrace.models",
    "load_transcoders": "cltrace.transcoders",
    "TranscoderSet": "cltrace.transcoders",
    "ReplacementModel": "cltrace.replacement",
    "ReplacementState": "cltrace.replacement",
    "ActiveFeatures": "cltrace.replacement",
    "FrozenLinearModel": "cltrace.frozen",
    "Seeds": "cltrace.frozen",
    "attribute": "cltrace.attribution",
    "AttributionSettings": "cltrace.attribution",
    "explain_attention": "cltrace.attention",
    "qk_attribution": "cltrace.attention",
    "QKSettings": "cltrace.attention",
    "PruneSettings": "cltrace.graph",
    "UsageError": "cltrace.errors",
    "Graph": "cltrace.graph",
    "prune": "cltrace.graph",
    "graph_scores": "cltrace.graph",
    "Intervention": "cltrace.steering",
    "InterventionResult": "cltrace.steering",
    "Generation": "cltrace.steering",
    "intervene": "cltrace.steering",
    "generate": "cltrace.steering",
    "SparseActs": "cltrace.ops",
    "show": "cltrace.serve",
    "FeaturePages": "cltrace.features",
    "evaluate_set": "cltrace.evaluation",
    "EvalSettings": "cltrace.evaluation",
    "EvalReport": "cltrace.evaluation",
    "feature_lens": "cltrace.lens",
    "LensReport": "cltrace.lens",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from .attention import QKSettings, explain_attention, qk_attribution  # noqa: F401
    from .attribution import AttributionSettings, attribute  # noqa: F401
    from .errors import UsageError  # noqa: F401
    from .evaluation import EvalReport, EvalSettings, evaluate_set  # noqa: F401
    from .lens import LensReport, feature_lens  # noqa: F401
    from .features import FeaturePages  # noqa: F401
    from .frozen import FrozenLinearModel, Seeds  # noqa: F401
    from .graph import Graph, PruneSettings, graph_scores, prune  # noqa: F401
    from .models import load_model  # noqa: F401
    from .ops import SparseActs  # noqa: F401
    from .replacement import ActiveFeatures, ReplacementModel, ReplacementState  # noqa: F401
    from .steering import Generation, Intervention, InterventionResult, generate, intervene  # noqa: F401
    from .serve import show  # noqa: F401
    from .transcoders import TranscoderSet, load_transcoders  # noqa: F401


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cltrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class BuildInfo(NamedTuple):
    """What the compiled extension was built with."""

    version: str
    cpu: bool
    cuda: bool  # CUDA kernels compiled in
    cuda_available: bool  # ... and a CUDA device usable now
    torch_version: str
    torch_cuda_version: str  # CUDA version of the torch the extension was built against ("" if none)
    compiler: str
    openmp: int  # _OPENMP date of the CPU kernels (0: single-threaded build)


def build_info() -> BuildInfo:
    """Report what ``cltrace._C`` was compiled with (CPU/CUDA kernels, versions)."""
    import torch

    from . import _C

    return BuildInfo(
        version=__version__,
        cpu=torch._C._dispatch_has_kernel_for_dispatch_key("cltrace::sparse_decode", "CPU"),
        cuda=bool(_C.with_cuda),
        cuda_available=bool(_C.with_cuda) and torch.cuda.is_available(),
        torch_version=torch.__version__,
        torch_cuda_version=_C.torch_cuda_version,
        compiler=_C.compiler,
        openmp=_C.openmp,
    )


__all__ = sorted([*_LAZY, "BuildInfo", "build_info", "__version__"])
