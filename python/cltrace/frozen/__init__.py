"""The frozen linear model of one prompt (Ameisen et al. 2025, "Circuit Tracing").

:mod:`.capture` runs the real model once and records what the linearisation freezes (attention
patterns, norm denominators, MLP inputs and outputs); :mod:`.attention` stores the frozen
patterns (banded for sliding-window layers) and multiplies by them; :mod:`.model` is the
linear map with its forward and its hand-written backward (VJP); :mod:`.jvp` its forward JVP
(columns of the attribution matrix).
"""
from .capture import Capture, LayerCapture, capture
from .model import EMBED, FrozenLinearModel, FrozenOutput, LayerGrad, Seeds

__all__ = ["Capture", "EMBED", "FrozenLinearModel", "FrozenOutput", "LayerCapture",
           "LayerGrad", "Seeds", "capture"]
