"""The end-to-end tests' simulations share one Ray instance and one pool of client processes.

Each in-process simulation would otherwise start Ray and new actor processes (which import torch,
Flower and fedtl) and shut them down again: ~10 s of a 15-25 s test on 2 cores. ``kept_warm()``
is what a study and ``--compare-scratch`` use for the same reason; every run still gets its own
run id, SuperNodes, node states and strategy. A test that needs Ray to itself (an environment its
client processes must inherit, or Flower's own backend instead of fedtl's) asks for ``own_ray``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedtl.simulations.backend import WARM, release
from fedtl.simulations.runtime import kept_warm


@pytest.fixture(scope="session", autouse=True)
def warm_runtime() -> Iterator[None]:
    with kept_warm():
        yield


@pytest.fixture
def own_ray() -> Iterator[None]:
    """Inside the test, each simulation starts and ends its own Ray (fresh processes, the current environment)."""
    WARM.pop("on", None)
    release()
    try:
        yield
    finally:
        WARM["on"] = True
