"""`fedtl simulate --ray-address`: a simulation on a Ray cluster started outside it (`ray start --head`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedtl.simulations.simulate import simulate
from tests.helpers import make_config

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulation_runs_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    import ray

    from fedtl.simulations.backend import release

    port = _free_port()
    temp = Path(os.environ.get("RAY_TMPDIR", "/tmp/fedtl-ray")) / "head"  # short: Ray's socket paths max out at 107
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    try:
        # The suite keeps one Ray warm (tests/e2e/conftest.py), as a study does: a local one is up, as an earlier
        # run leaves it. Before, Flower ran the cluster's run on it (it starts Ray only where none is up).
        if not ray.is_initialized():
            ray.init(include_dashboard=False, num_cpus=2)
        cfg = make_config("clients=2", "rounds=1", f"simulation.ray-address='127.0.0.1:{port}'",
                          f"out={str(tmp_path / 'run')!r}")
        summary = simulate(cfg)
        assert summary["rounds"] == 1 and (tmp_path / "run" / "summary.json").is_file()
        release()  # the kept pool and Ray are the cluster's now: leave them, so that the run's driver ends
        # The run was a job of the cluster `ray start` made, not of a private Ray instance.
        ray.init(address=f"127.0.0.1:{port}")
        try:
            jobs = ray._private.state.jobs()  # the simulation's driver, finished, and this one
        finally:
            ray.shutdown()
        assert len(jobs) == 2 and sum(bool(j["IsDead"]) for j in jobs) == 1
    finally:
        # Stops every Ray process of this machine (the kept one is already left): e2e tests run one at a time.
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
