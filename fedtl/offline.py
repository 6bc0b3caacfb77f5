"""The environment that keeps Flower and Ray on loopback and off the internet.

Flower reads some of these variables once, when it is first imported (telemetry), so
``fedtl/__init__.py`` applies them before any of fedtl's modules imports flwr.
User-set values win: only missing variables are set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # SuperLink/SuperNode/simulation otherwise post telemetry
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # flwr's CLIs otherwise post an update check
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # otherwise `uv sync` against the index
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply_offline_environment() -> None:
    """Set the offline variables, plus ``FLWR_HOME`` and ``RAY_TMPDIR``, where unset.

    ``RAY_TMPDIR`` defaults to a short path: Ray's Unix sockets live under it, and
    socket paths are limited to 107 bytes.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    base = Path(tempfile.gettempdir())
    os.environ.setdefault("FLWR_HOME", str(base / "fedtl-flwr-home"))
    os.environ.setdefault("RAY_TMPDIR", str(base / "fedtl-ray"))
