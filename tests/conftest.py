"""Shared test set-up: offline Flower/Ray, deliberate thread counts, a shared weights cache (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP = ROOT / ".tmp"

# Before anything imports flwr or ray: keep every process on loopback and off the internet.
os.environ.update(
    FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    RAY_USAGE_STATS_ENABLED="0",
)
os.environ.setdefault("FLWR_HOME", str(TMP / "flwr-home"))
# Short: Ray's Unix sockets live under it, and socket paths max out at 107 bytes.
os.environ.setdefault("RAY_TMPDIR", "/tmp/fedtl-ray")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import CACHE  # noqa: E402

# Two cores: unit tests use both; simulated clients set one thread each themselves.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture
def task_identity():
    """Flower's process identity, which constructing a Message outside a run requires."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
