"""Steering: feature interventions in the frozen replacement model or the real model, and
steered generation. :mod:`.interventions` says what an intervention is, :func:`.modes.intervene`
runs them, :mod:`.generation` generates with them; :mod:`.sae` steers with SAE latents at
their site; :mod:`.inputs` is what the real model reads (token ids, or an image prompt's
embeddings). The causal test on a set of prompts: :mod:`.prompt_set` (the loop), :mod:`.metrics`,
:mod:`.stats`, :mod:`.set_ray` (the same on Ray actors), :mod:`.ablation` (a contrast report's
top features ablated on both sets)."""
from .generation import Generation, generate
from .modes import intervene
from .interventions import Intervention, InterventionResult
from .sae import SaeSteering

__all__ = ["Generation", "Intervention", "InterventionResult", "SaeSteering", "generate", "intervene"]
