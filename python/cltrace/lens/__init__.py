"""The feature lens: the top active latents of dictionaries (SAEs, transcoders, CLTs,
crosscoders) at every token of a text, layer by layer, from one forward pass.

Neuronpedia's "search via inference", offline: :func:`lens` runs the model once, recording the
site each set reads (:func:`cltrace.models.sites.site_hooks`), encodes every layer with the
compiled JumpReLU encoder (:func:`cltrace.ops.jumprelu_encode`) and keeps the ``top_k``
latents of each (set, layer, position). :class:`LensReport` holds them, prints the terminal
table and writes the JSON the viewer's lens page reads.
"""
from .report import LENS_FORMAT, LensReport, LensSet
from .run import lens, lens_layers

__all__ = ["lens", "lens_layers", "LensReport", "LensSet", "LENS_FORMAT"]


class _LensModule(type(__import__("sys"))):
    """This package, callable as :func:`lens`: ``cltrace.lens`` names both the package and
    the function (whichever an import left there, ``cltrace.lens(model, sets, text)`` works)."""

    def __call__(self, *args, **kwargs):
        return lens(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _LensModule
