"""The local replacement model: a Gemma 3 model with a transcoder set, on one prompt at a time.

:mod:`.encoding` encodes MLP inputs, reconstructs MLP outputs and keeps the error vectors;
:mod:`.state` is what one prompt's run holds; :mod:`.model` builds it.
"""
from .encoding import Reconstruction
from .model import ReplacementModel
from .state import ActiveFeatures, ReplacementState

__all__ = ["ActiveFeatures", "Reconstruction", "ReplacementModel", "ReplacementState"]
