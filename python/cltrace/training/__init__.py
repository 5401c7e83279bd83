"""Training JumpReLU transcoders (Gemma Scope 2 recipe) with the compiled sparse kernels.

    from cltrace.training import TrainConfig, train_transcoders
    result = train_transcoders(loaded, TrainConfig(width=2048, l0=32, tokens=100_000), texts)
    save_gemmascope(result.transcoders, "my-transcoders")

:mod:`.model` holds the weights, the loss and the L0 controller, :mod:`.loop` the loop,
checkpoints and evaluation, :mod:`.corpus` the offline text and its held-out parts,
:mod:`.run` the end-to-end entry point used by ``cltrace train`` and :mod:`.starter` the
starter sets.
"""
from .loop import EvalResult, Trainer, TrainResult, evaluate
from .model import StepStats, TrainConfig, TranscoderParams
from .run import train_transcoders

__all__ = ["TrainConfig", "TrainResult", "EvalResult", "Trainer", "TranscoderParams", "StepStats", "evaluate",
           "train_transcoders"]
