"""The privacy ledger, on hand-made round reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedtl.accounting import client_level_accountant, replace_one_sample_epsilon, sample_epsilon
from fedtl.config import ConfigError
from fedtl.privacy import privacy_mode
from fedtl.server.ledger import PrivacyLedger
from fedtl.strategies.report import RoundReport
from tests.helpers import make_config


def _client(pid: int, eps: float, declined: bool = False, steps: int = 10) -> dict:
    return {"node-id": 100 + pid, "partition-id": pid, "declined": declined, "privacy.epsilon": eps,
            "privacy.delta": 1e-5, "privacy.steps": steps, "privacy.noise-multiplier": 1.1, "privacy.sample-rate": 0.2}


def test_sample_level_ledger_keeps_each_clients_spend_and_states_the_largest(tmp_path: Path) -> None:
    cfg = make_config("privacy.mode=dp-sgd", "max-epsilon=5")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg), round_epochs=lambda rnd: 2)  # 10 steps a round
    ledger.on_round(RoundReport(1, {}, [_client(0, 1.0), _client(1, 1.5), {"node-id": 9, "train-loss": 1.0}]))
    ledger.on_round(RoundReport(2, {}, [_client(0, 2.0, steps=20), _client(1, 1.5, declined=True)]))
    rows = [json.loads(line) for line in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    assert [(r["round"], r["client"], r["epsilon"]) for r in rows] == [(1, "0", 1.0), (1, "1", 1.5), (2, "0", 2.0),
                                                                        (2, "1", 1.5)]
    assert rows[0]["noise_multiplier"] == 1.1 and rows[3]["declined"] is True
    summary = ledger.summary()
    # Neither the sum (3.5) nor the mean (1.75): the largest spend.
    assert summary["epsilon_max"] == 2.0 and summary["epsilon_per_client"] == {"0": 2.0, "1": 1.5}
    assert summary["clients_out_of_budget"] == ["1"] and summary["budget"] == 5.0
    # The guarantee is replace-one's (the count is published), from the steps the ledger counted (20 at σ 1.1,
    # q 0.2 for client 0); the add-or-remove figure the clients report stands beside it.
    ro = replace_one_sample_epsilon([(1.1, 0.2, 20)], delta=1e-5)
    assert summary["epsilon_replace_one"] == pytest.approx(ro) and ro > sample_epsilon([(1.1, 0.2, 20)],
                                                                                      accountant="rdp", delta=1e-5)
    assert summary["guarantee"].startswith(f"each client's data is (ε, δ)-DP at sample level for ε ≤ {ro:.4g}, "
                                           "δ = 1e-05")
    assert "Under add-or-remove adjacency, which holds only against someone who never learns the count, ε ≤ 2 " \
        in summary["guarantee"]
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
    # Zero-out is what is accounted; swapping one client's updates for another's doubles the sensitivity.
    assert "replaced by nothing (zero-out" in ledger.guarantee() and "not the server" in ledger.guarantee()
    acc.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=4, population_size=4), count=3)
    replace_one = client_level_accountant(4, 1e-5, None)
    replace_one.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=4, population_size=4))
    replace_one.compose(GaussianPrivacyEvent(noise_multiplier=0.5, sample_size=4, population_size=4), count=3)
    summary = ledger.summary()
    assert summary["accountant"] == "flower-rdp" and summary["epsilon_replace_one"] == pytest.approx(
        replace_one.get_epsilon(1e-5))
    assert summary["epsilon_replace_one"] > 2 * summary["epsilon_max"]


def test_the_sentence_says_what_each_accountant_gives(tmp_path: Path) -> None:
    from fedtl.accounting import sample_epsilon

    # Opacus's GDP accountant is a CLT approximation that can underestimate epsilon: never "ε ≤".
    for accountant, bound in (("rdp", "ε ≤ 2 (Opacus's RDP"), ("prv", "ε ≤ 2 (Opacus's PRV"),
                              ("gdp", "ε ≈ 2 (Opacus's GDP accountant: an approximation that can underestimate ε")):
        cfg = make_config("privacy.mode=dp-sgd", f"privacy.accountant={accountant}")
        ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg))
        ledger.on_round(RoundReport(1, {}, [_client(0, 2.0)]))
        assert bound in ledger.guarantee() and ledger.summary()["accountant"] == accountant
        side_by_side = ledger.summary()["epsilon_max_by_accountant"]  # the same 10 steps at sigma 1.1, q 0.2
        assert side_by_side["rdp"] == pytest.approx(sample_epsilon([(1.1, 0.2, 10)], accountant="rdp", delta=1e-5))
        assert set(side_by_side) == {"rdp", "prv", "gdp"} and side_by_side["prv"] < side_by_side["rdp"]
        assert "have the same size and differ in one labelled example replaced by another" in ledger.guarantee()
        assert "every reply publishes the client's example count" in ledger.guarantee()


def test_the_guarantee_adds_the_tighter_of_rdp_and_prv_taken_per_client(tmp_path: Path) -> None:
    from fedtl.accounting import sample_epsilon

    def bound(history: tuple[float, float, int], accountant: str) -> float:
        return sample_epsilon([history], accountant=accountant, delta=1e-5)

    mine, theirs = (1.1, 0.2, 10), (0.7, 0.05, 40)
    cfg = make_config("privacy.mode=dp-sgd")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg))
    other = {**_client(1, bound(theirs, "rdp"), steps=40), "privacy.noise-multiplier": 0.7, "privacy.sample-rate": 0.05}
    ledger.on_round(RoundReport(1, {}, [_client(0, bound(mine, "rdp")), other]))
    assert ledger.spent == {"0": mine, "1": theirs}
    # Each client's smaller bound, then the largest over clients (never one client's PRV for everyone).
    expected = max(min(bound(h, a) for a in ("rdp", "prv")) for h in (mine, theirs))
    summary = ledger.summary()
    assert summary["epsilon_max_tightest"] == pytest.approx(expected) and expected < summary["epsilon_max"]
    assert f"(both upper bounds): ε ≤ {expected:.4g} at the same δ" in summary["guarantee"]
    # A client that has taken no step yet (it declined its only round) spends nothing under either bound.
    ledger.on_round(RoundReport(2, {}, [{**_client(2, 0.0, steps=0), "declined": True}]))
    assert ledger.summary()["epsilon_max_tightest"] == pytest.approx(expected)
    gdp = make_config("privacy.mode=dp-sgd", "privacy.accountant=gdp")
    ledger = PrivacyLedger(tmp_path, gdp, privacy_mode(gdp))
    ledger.on_round(RoundReport(1, {}, [_client(0, 2.0)]))
    assert ledger.summary()["epsilon_max_tightest"] is None and "Tighter" not in ledger.summary()["guarantee"]


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


def test_a_client_sent_training_that_never_replied_is_charged_the_round(tmp_path: Path) -> None:
    # 20 examples in batches of 4: q = 0.2, 5 steps an epoch, 2 epochs a round; noise multiplier 1.
    from fedtl.accounting import sample_epsilon

    cfg = make_config("privacy.mode=dp-sgd", "finetune.batch-size=4", "local-epochs=2")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg))

    def eps(steps: int) -> float:
        return sample_epsilon([(1.0, 0.2, steps)], accountant="rdp", delta=1e-5)

    # Round 1: partition 1's reply came after the round timeout; it declared 20 examples when asked.
    ledger.on_round(RoundReport(1, {}, [_client(0, eps(10))], unanswered=[
        {"node-id": 101, "partition-id": 1, "num-examples": 20}, {"node-id": 7}]))
    rows = [json.loads(line) for line in (tmp_path / "privacy.jsonl").read_text().splitlines()]
    late = rows[1]
    assert (late["client"], late["unanswered"], late["steps"], late["noise_multiplier"], late["sample_rate"]) == \
        ("1", True, 10, 1.0, 0.2)
    assert late["epsilon"] == pytest.approx(eps(10))
    assert rows[2] == {"round": 1, "client": "node-7", "node_id": 7, "declined": False, "unanswered": True,
                       "epsilon": None}  # no report, no count: unknown, and said so
    assert ledger.summary()["clients_spend_unknown"] == ["node-7"] and "node-7" in ledger.guarantee()
    # Round 2: it reports 10 steps in all (round 1's training was lost before it began, or it says less than
    # it spent): the ledger counts both rounds it was sent.
    ledger.on_round(RoundReport(2, {}, [{**_client(1, eps(10), steps=10), "privacy.noise-multiplier": 1.0}]))
    last = json.loads((tmp_path / "privacy.jsonl").read_text().splitlines()[-1])
    assert (last["steps"], last["reported_steps"]) == (20, 10) and last["epsilon"] == pytest.approx(eps(20))
    assert ledger.summary()["epsilon_per_client"]["1"] == pytest.approx(eps(20))
    # A resumed run rebuilds the count from the lines it keeps.
    again = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg), resume_round=2)
    assert again.spent["1"] == (1.0, 0.2, 20) and again.unknown == {"node-7"}


def test_a_summary_at_tiny_noise_is_written_by_the_accountants_that_can_state_it(tmp_path: Path) -> None:
    # σ = 1e-3 is a legal config; Opacus's PRV then asked for 83.8 GiB and the summary died of MemoryError.
    cfg = make_config("privacy.mode=dp-sgd", "noise-multiplier=0.001")
    ledger = PrivacyLedger(tmp_path, cfg, privacy_mode(cfg))
    tiny = {**_client(0, 5.5e6), "privacy.noise-multiplier": 1e-3}
    ledger.on_round(RoundReport(1, {}, [tiny]))
    summary = ledger.summary()
    by = summary["epsilon_max_by_accountant"]
    assert by["prv"] is None and by["gdp"] is None and by["rdp"] == pytest.approx(
        sample_epsilon([(1e-3, 0.2, 10)], accountant="rdp", delta=1e-5))
    assert "GiB an array" in summary["accountants_skipped"]["prv"] and "set privacy.accountant" in \
        summary["accountants_skipped"]["gdp"]
    assert summary["epsilon_max_tightest"] == by["rdp"]  # PRV left out, RDP still bounds
    assert summary["epsilon_replace_one"] > by["rdp"]  # the RDP triangle bound, finite
    assert "Not stated by gdp, prv (too little noise for its method)" in summary["guarantee"]
    # The run's own accountant cannot be one that states nothing at this noise: the config refuses it.
    with pytest.raises(ConfigError, match="privacy.accountant = \"gdp\" cannot state epsilon.*set privacy.accountant"):
        make_config("privacy.mode=dp-sgd", "noise-multiplier=0.05", "privacy.accountant=gdp")
