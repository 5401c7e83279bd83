"""Attribution: the direct effects between features, errors, tokens and logits of one prompt.

:mod:`.targets` chooses the logit targets, :mod:`.rows` computes rows of direct effects for a
batch of targets, :mod:`.trace` visits the features and assembles the :class:`Graph`.
"""
from .settings import AttributionSettings
from .trace import attribute
from .rows import EdgeRows
from .targets import LogitTarget, TargetSpec

__all__ = ["AttributionSettings", "EdgeRows", "LogitTarget", "TargetSpec", "attribute"]
