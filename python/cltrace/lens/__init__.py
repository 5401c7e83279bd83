"""The feature lens: the top active latents of dictionaries (SAEs, transcoders, CLTs,
crosscoders) at every token of a text, layer by layer, from one forward pass.

Neuronpedia's "search via inference", offline: :func:`feature_lens` runs the model once, recording the
site each set reads (:func:`cltrace.models.sites.site_hooks`), encodes every layer with the
compiled JumpReLU encoder (:func:`cltrace.ops.jumprelu_encode`) and keeps the ``top_k``
latents of each (set, layer, position). :class:`LensReport` holds them, prints the terminal
table and writes the JSON the viewer's lens page reads.

With images in the prompt (a multimodal Gemma 3) the pass reads the soft tokens with the
bidirectional image mask, and each image gets, per (set, layer), its top latents and their
activation at each of its patches (:mod:`cltrace.lens.images`).
"""
from .images import ImageMap, LensImage
from .report import LENS_FORMAT, TOP_PATCHES, LensReport, LensSet
from .run import feature_lens, lens_layers

__all__ = ["feature_lens", "lens_layers", "LensReport", "LensSet", "LensImage", "ImageMap",
           "LENS_FORMAT", "TOP_PATCHES"]
