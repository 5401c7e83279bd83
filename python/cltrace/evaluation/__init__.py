"""Evaluating a dictionary set on text: reconstruction, sparsity and the loss when spliced in.

    from cltrace.evaluation import EvalSettings, evaluate_set
    report = evaluate_set(loaded, transcoders, rows, EvalSettings())
    print(report.table())

Any set: transcoders (MLP input -> MLP output), SAEs at resid_post, attn_out or mlp_out, or a
crosscoder. Per layer: the FVU of the reconstruction of the set's output site, the L0 (mean and
its distribution over tokens), the dead and dense feature fractions, and the next-token
cross-entropy with that layer's site replaced by the reconstruction, against the clean model
and the site zero-ablated (delta CE, fraction of loss recovered); docs/method.md ("Evaluating a
dictionary") defines each. ``cltrace eval`` is the command (:mod:`cltrace.commands.eval`).

:mod:`.metrics` holds the FVU sums (also what :func:`cltrace.training.loop.evaluate` reports),
:mod:`.settings` the options, :mod:`.run` the passes over the model, :mod:`.report` the
report (table, JSON) and :mod:`.plot` its SVG picture, drawn in pure Python.

Stage rank 3 (tests/test_layout.py), beside ``frozen``: it reads only the model's anatomy and
sites (``models``, rank 1), the dictionary sets (``transcoders``, rank 2) and the compiled encode and
decode (``ops``, rank 0). It needs neither the frozen linear model nor the replacement model
(the splice is a hook on the real model), so it sits below ``replacement`` (4) and
``training`` (5): the training loop and anything above can evaluate with it.
"""
from .metrics import FVUSums
from .report import EvalReport, LayerEval
from .run import evaluate_set, evaluated_layers
from .settings import EvalSettings

__all__ = ["EvalReport", "EvalSettings", "FVUSums", "LayerEval", "evaluate_set", "evaluated_layers"]
