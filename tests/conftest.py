"""Test tiers and shared fixtures.

Two tiers. By default the FAST tier runs (``python -m pytest -q``: the kernels, the graph
identities and the CLI on the tiny model, a few minutes): the tests marked ``real_model``,
``browser``, ``ray``, ``peer`` or ``slow`` are deselected, and the summary says how many.
``--full`` (or ``CLTRACE_FULL_TESTS=1``) runs everything, as ``.ci/run`` does. An ``-m``
expression selects by markers alone (``-m real_model``, ``-m cuda``), and a test named on the
command line (``tests/test_x.py::test_y``) runs, in either tier.

Tests marked ``cuda`` are collected everywhere and skipped without a CUDA device. Where a
browser, Ray or circuit-tracer's venv is missing, their tests skip, and fail under ``CI=true``.

Fixtures: the devices to test on, a fixed torch seed per test, the real Gemma 3 270M (once per
session). Helpers are in the ``support`` package.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from support.numerics import DEVICES

FULL_ONLY = ("real_model", "browser", "ray", "peer", "slow")  # the markers the fast tier leaves out
FULL_ENV = "CLTRACE_FULL_TESTS"


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="run the full suite: also the tests marked " + ", ".join(FULL_ONLY)
                          + f" (as .ci/run does; or {FULL_ENV}=1)")


def _full(config) -> bool:
    return config.getoption("--full") or os.environ.get(FULL_ENV, "") not in ("", "0")


def pytest_report_header(config):
    if config.getoption("markexpr"):
        return "tier: by the -m expression"
    return "tier: full" if _full(config) else \
        "tier: fast (" + ", ".join(FULL_ONLY) + " deselected; --full runs everything)"


def _named(config) -> list[str]:
    """The test ids named on the command line (``path::test``), relative to the rootdir."""
    out = []
    for arg in config.args:
        path, sep, rest = arg.partition("::")
        if sep:
            try:
                rel = Path(path).resolve().relative_to(config.rootpath).as_posix()
            except ValueError:
                continue
            out.append(f"{rel}::{rest}")
    return out


def pytest_collection_modifyitems(config, items):
    if not _full(config) and not config.getoption("markexpr"):
        named = _named(config)  # a test named on the command line runs in either tier

        def full_only(item) -> bool:
            if any(item.nodeid == n or item.nodeid.startswith((n + "[", n + "::")) for n in named):
                return False
            return any(item.get_closest_marker(m) for m in FULL_ONLY)

        keep, left_out = [], []
        for item in items:
            (left_out if full_only(item) else keep).append(item)
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = keep
        config._cltrace_left_out = len(left_out)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_cltrace_left_out", 0)
    if n:
        terminalreporter.write_line(
            f"fast tier: {n} tests marked {'/'.join(FULL_ONLY)} not run; "
            f"run everything with `python -m pytest -q --full` (or {FULL_ENV}=1)")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_gemma():
    """The real Gemma 3 270M (float32, CPU), loaded once per session for the real_model tests.
    Tests must not modify it."""
    from cltrace.models import load_model

    return load_model("gemma-3-270m", device="cpu", dtype=torch.float32)
