"""Training JumpReLU transcoders (Gemma Scope 2 recipe) with the compiled sparse kernels.

    from cltrace.training import TrainConfig, train_transcoders
    result = train_transcoders(loaded, TrainConfig(width=2048, l0=32, tokens=100_000), texts)
    save_gemmascope(result.transcoders, "my-transcoders")

:mod:`.model` holds the weights and the loss, :mod:`.loop` the loop, checkpoints and
evaluation, :mod:`.run` the end-to-end entry point used by ``cltrace train`` and the starter set.
"""
from .loop import Trainer, TrainResult, evaluate
from .model import StepStats, TrainConfig, TranscoderParams
from .run import train_transcoders

__all__ = ["TrainConfig", "TrainResult", "Trainer", "TranscoderParams", "StepStats", "evaluate",
           "train_transcoders"]
