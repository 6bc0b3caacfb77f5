"""Differential privacy end to end on real Flower + Ray: the ledger, budgets, client-level DP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtl.accounting import client_level_epsilon, replace_one_sample_epsilon, sample_epsilon
from fedtl.reports.runs import read_metrics
from fedtl.simulations.simulate import simulate
from tests.helpers import make_config, run_fedtl

pytestmark = pytest.mark.e2e

# 20 images in batches of 4 per client: q = 0.2, 5 DP-SGD steps an epoch, 2 epochs a round.
SMALL_DP = ("clients=3", "privacy.mode=dp-sgd", "labelled-per-client=20", "finetune.batch-size=4", "local-epochs=2")


def _ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "privacy.jsonl").read_text().splitlines()]


def test_dp_sgd_run_accounts_every_step_of_every_client(tmp_path: Path) -> None:
    out = tmp_path / "dp"
    # Gradual unfreezing: the trainable set grows every round and the accountant carries on.
    cfg = make_config(*SMALL_DP, "rounds=3", "finetune.mode=gradual-unfreezing", "unfreeze-every=1",
                      f"out={str(out)!r}")
    summary = simulate(cfg)

    rows = _ledger(out)
    assert len(rows) == 9 and {r["client"] for r in rows} == {"0", "1", "2"}
    for client in ("0", "1", "2"):
        spent = [r["epsilon"] for r in rows if r["client"] == client]
        assert [r["steps"] for r in rows if r["client"] == client] == [10, 20, 30]
        assert spent == pytest.approx([sample_epsilon([(1.0, 0.2, n)], accountant="rdp", delta=1e-5)
                                       for n in (10, 20, 30)], abs=1e-9)
    expected = sample_epsilon([(1.0, 0.2, 30)], accountant="rdp", delta=1e-5)
    assert summary["privacy"]["epsilon_max"] == pytest.approx(expected)
    # The guarantee is replace-one's (every reply publishes the count; PLD: 11.47 where RDP add/remove says 8.93),
    # with the accountant's add-or-remove figure beside it.
    replace_one = replace_one_sample_epsilon([(1.0, 0.2, 30)], delta=1e-5)
    assert summary["privacy"]["epsilon_replace_one"] == pytest.approx(replace_one) and replace_one > expected
    assert f"sample level for ε ≤ {replace_one:.4g}, δ = 1e-05" in summary["privacy"]["guarantee"]
    assert f"never learns the count, ε ≤ {expected:.4g} (Opacus's RDP" in summary["privacy"]["guarantee"]
    assert [r["epsilon"] for r in read_metrics(out)] == pytest.approx(
        [0.0, *(sample_epsilon([(1.0, 0.2, n)], accountant="rdp", delta=1e-5) for n in (10, 20, 30))])
    assert (out / "privacy.png").stat().st_size > 10_000
    assert summary["stopped_early"] is None


def test_a_spent_budget_ends_the_run_and_keeps_what_was_computed(tmp_path: Path) -> None:
    out = tmp_path / "budget"
    one = sample_epsilon([(1.0, 0.2, 10)], accountant="rdp", delta=1e-5)
    two = sample_epsilon([(1.0, 0.2, 20)], accountant="rdp", delta=1e-5)
    cfg = make_config(*SMALL_DP, "rounds=4", f"max-epsilon={(one + two) / 2}", f"out={str(out)!r}")
    summary = simulate(cfg)
    # Round 2: every client declines, the model stays; round 3 finds nobody left to train.
    assert summary["rounds"] == 2 and "0 client(s) can still train" in summary["stopped_early"]
    rows = read_metrics(out)
    assert rows[2]["clients_declined"] == 3 and rows[2]["accuracy"] == rows[1]["accuracy"]
    assert summary["privacy"]["clients_out_of_budget"] == ["0", "1", "2"]
    assert summary["privacy"]["epsilon_max"] == pytest.approx(one)
    assert [r["declined"] for r in _ledger(out)] == [False] * 3 + [True] * 3
    assert (out / "checkpoints" / "last.safetensors").is_file()


def test_client_level_dp_with_flowers_wrapper_and_accountant(tmp_path: Path) -> None:
    out = tmp_path / "client-level"
    cfg = make_config("clients=3", "rounds=2", "privacy.mode=client-level", "noise-multiplier=0.3",
                      f"out={str(out)!r}")
    summary = simulate(cfg)
    rows = _ledger(out)
    assert [(r["client"], r["releases"]) for r in rows] == [("all", 1), ("all", 2)]
    expected = client_level_epsilon(0.3, releases=2, sampled=3, population=3, delta=1e-5)
    assert summary["privacy"]["epsilon_max"] == pytest.approx(expected)
    assert "at client level" in summary["privacy"]["guarantee"]
    assert read_metrics(out)[2]["clients_ok"] == 3


def test_cli_refuses_trainable_batchnorm_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "bn"
    done = run_fedtl("simulate", "--set", "privacy.mode='dp-sgd'", "--set", "model.backbone='resnet18'",
                  "--set", "finetune.mode='full'", "--out", str(out))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "DP-SGD cannot train BatchNorm layers" in done.stdout and 'model.norm = "group"' in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()
