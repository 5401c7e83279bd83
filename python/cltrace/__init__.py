"""cltrace: attribution graphs (circuit tracing) for Gemma 3 with Gemma Scope 2 transcoders.

The compiled core (``cltrace._C``) provides sparse transcoder encode/decode and the
attribution contraction for CPU and, when built with it, CUDA; see :mod:`cltrace.ops`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import _C, ops  # noqa: F401  (importing _C registers torch.ops.cltrace.*)
from .ops import SparseActs
from .frozen import FrozenLinearModel, Seeds
from .replacement import ActiveFeatures, ReplacementModel, ReplacementState
from .intervene import Intervention, InterventionResult
from .generate import Generation

__version__ = "0.1.0"


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


__all__ = ["ActiveFeatures", "BuildInfo", "FrozenLinearModel", "Generation", "Intervention",
           "InterventionResult", "ReplacementModel", "ReplacementState", "Seeds", "SparseActs", "build_info", "ops"]
