"""The privacy ledger, on hand-made round reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedtl.accounting import client_level_accountant
from fedtl.config import ConfigError
from fedtl.privacy import privacy_mode
from fedtl.server.ledger import PrivacyLedger
from fedtl.strategies.transfer import RoundReport
from tests.helpers import make_config


def _client(pid: int, eps: float, declined: bool = False) -> dict:
    return {"node-id": 100 + pid, "partition-id": pid, "declined": declined, "privacy.epsilon": eps,
            "privacy.delta": 1e-5, "privacy.steps": 10, "privacy.noise-multiplier": 1.1, "privacy.sample-rate": 0.2}


def test_sample_level_ledger_keeps_each_clients_spend_and_states_the_largest(tmp_path: Path) -> None:
    cfg = make_config("privacy.mode=dp-sgd", "max-epsilon=5")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg))
    ledger.on_round(RoundReport(1, {}, [_client(0, 1.0), _client(1, 1.5), {"node-id": 9, "train-loss": 1.0}]))
    ledger.on_round(RoundReport(2, {}, [_client(0, 2.0), _client(1, 1.5, declined=True)]))
    rows = [json.loads(line) for line in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    assert [(r["round"], r["client"], r["epsilon"]) for r in rows] == [(1, "0", 1.0), (1, "1", 1.5), (2, "0", 2.0),
                                                                        (2, "1", 1.5)]
    assert rows[0]["noise_multiplier"] == 1.1 and rows[3]["declined"] is True
    summary = ledger.summary()
    # Neither the sum (3.5) nor the mean (1.75): the largest spend.
    assert summary["epsilon_max"] == 2.0 and summary["epsilon_per_client"] == {"0": 2.0, "1": 1.5}
    assert summary["clients_out_of_budget"] == ["1"] and summary["budget"] == 5.0
    assert summary["guarantee"].startswith("each client's data is (ε, δ)-DP at sample level for ε ≤ 2, δ = 1e-05")
    ledger.plot([{"round": 1, "accuracy": 0.5, "epsilon": 1.5}, {"round": 2, "accuracy": 0.6, "epsilon": 2.0}])
    assert (tmp_path / "privacy.png").stat().st_size > 10_000


def test_client_level_ledger_reads_the_servers_accountant(tmp_path: Path) -> None:
    acc = client_level_accountant(4, 1e-5, None)
    cfg = make_config("clients=4", "privacy.mode=client-level")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg), acc)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=2.0, sample_size=4, population_size=4))
    ledger.on_round(RoundReport(1, {}, [{"node-id": 1, "declined": False, "train-loss": 0.1}]))
    assert ledger.epsilon == pytest.approx(acc.get_epsilon(1e-5)) and ledger.noise_multiplier == 2.0
    assert "at client level" in ledger.guarantee() and "noise multiplier 2" in ledger.guarantee()


def test_privacy_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="max-epsilon = 2.0 is below privacy.target-epsilon = 3.0"):
        make_config("privacy.mode=dp-sgd", "target-epsilon=3", "max-epsilon=2")
    with pytest.raises(ConfigError, match="functorch"):
        make_config("privacy.grad-sample-mode=functorch")
    with pytest.raises(ConfigError, match="noise-multiplier"):
        make_config("privacy.noise-multiplier=0")
    assert make_config("target-epsilon=3").privacy.budget == 3.0
    assert make_config("target-epsilon=3", "max-epsilon=4").privacy.budget == 4.0
    assert make_config().privacy.budget is None
