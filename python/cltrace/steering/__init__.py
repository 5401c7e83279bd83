"""Steering: feature interventions in the frozen replacement model or the real model, and
steered generation. :mod:`.interventions` says what an intervention is, :func:`.modes.intervene`
runs them, :mod:`.generation` generates with them."""
from .generation import Generation, generate
from .modes import intervene
from .interventions import Intervention, InterventionResult

__all__ = ["Generation", "Intervention", "InterventionResult", "generate", "intervene"]
