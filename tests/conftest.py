"""Shared fixtures: the devices to test on, a fixed torch seed per test, the real Gemma 3 270M
(once per session). Tests marked ``cuda`` (CUDA against the CPU op, CUDA-only errors, allocator
peaks) are collected everywhere and skipped without a CUDA device. Helpers are in the
``support`` package."""
from __future__ import annotations

import pytest
import torch

from support.numerics import DEVICES

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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
