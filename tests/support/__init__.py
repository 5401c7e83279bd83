"""What the tests share (test modules import from here, never from one another):

* :mod:`support.numerics` — devices, dtypes and tolerances of the kernel tests, seeded random
  encoder and CSR inputs, :func:`support.numerics.torch_threads`.
* :mod:`support.transcoders` — :func:`support.transcoders.random_transcoders`, the one factory
  of random transcoder sets (calibrated on a model's MLP inputs or not), and the synthetic
  starter set of the real-model tests.
* :mod:`support.layouts` — a set written in the Gemma Scope 2 and circuit-tracer file layouts.
* :mod:`support.tiny_gemma` — the tiny random Gemma 3, a replacement model and feature-page
  inputs on it, stand-in tokenizers.
* :mod:`support.frozen` — logit seeds and the full-width backward of the frozen linear model.
* :mod:`support.graphs` — random attribution graphs with the causal structure of real ones.
* :mod:`support.batch`, :mod:`support.features` — tiny models saved for worker processes and
  Ray actors (and loaders that crash on purpose).
* :mod:`support.serve` — viewer fixtures: graph JSONs, a feature page, a headless Chromium.
* :mod:`support.peer` — circuit-tracer 0.5.0 in its own venv (``python tests/support/peer.py``
  creates it).

pytest puts ``tests/`` on ``sys.path`` (its default ``prepend`` import mode: tests/ is no
package), so the tests import this as ``support``; benchmarks import it as ``tests.support`` (its
modules import one another relatively). Worker processes and Ray actors of the batch and
feature tests get ``tests/`` on their ``PYTHONPATH`` to unpickle the loaders defined here.
"""
