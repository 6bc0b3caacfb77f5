"""Strategies other than FedAvg end to end on real Flower + Ray, with a growing key set."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import make_config

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", ["fedprox", "fedadam"])
def test_strategy_with_gradual_unfreezing(name: str, tmp_path: Path) -> None:
    out = tmp_path / name
    cfg = make_config(f"strategy.name={name}", "clients=3", "rounds=3", "finetune.mode=gradual-unfreezing",
                      "unfreeze-every=1", f"out={str(out)!r}")
    summary = simulate(cfg)
    rows = read_metrics(out)
    assert summary["strategy"] == name and [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["travelling_params"] > rows[2]["travelling_params"] > rows[1]["travelling_params"]
    assert rows[3]["bytes_down"] > rows[2]["bytes_down"] > rows[1]["bytes_down"]  # the growing set is what travels
    assert all(r["clients_ok"] == 3 for r in rows[1:]) and math.isfinite(summary["final_accuracy"])
