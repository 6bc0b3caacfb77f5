"""The empirical privacy audit end to end: canaries in one client, real Flower + Ray runs, the bound per level."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import CACHE, ROOT, run_fedtl

pytestmark = pytest.mark.e2e


def test_the_audit_finds_the_leak_without_dp_stays_below_the_accountant_with_it_and_catches_a_model_that_lies(
        tmp_path: Path) -> None:
    out = tmp_path / "audit"
    args = ("audit", "-c", str(ROOT / "experiments" / "audit.toml"), "--set", f"pretrain.cache-dir={str(CACHE)!r}",
            "--set", "pretrain.epochs=2", "--epsilons", "0.5,inf", "--out", str(out))
    done = run_fedtl(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "audit.json").read_text())
    dp, plain = result["levels"]
    assert result["spec"] | {"epsilons": None} == {"epsilons": None, "canaries": 200, "guesses": 40,
                                                   "confidence": 0.95, "canary_client": 0, "mode": "dp-sgd"}
    assert (dp["mode"], plain["mode"]) == ("dp-sgd", "off")
    assert dp["accounted_epsilon"] == pytest.approx(0.5, abs=0.01)
    # Without DP, client 0's released model gives its canaries away: most guesses right, epsilon > 1 refuted.
    # (At the config's 5 rounds: 40, 40, 39 of 40 right in three runs, AUC 0.93-0.97; at 3 rounds 34, 39,
    # 34, 34, AUC 0.70-0.78, too close to the 35 asserted. The canaries' coins are fresh every run.)
    assert plain["correct"] >= 35 and plain["epsilon_lower_bound"] > 1.0, plain
    # With DP-SGD at epsilon 0.5 the guesses are near chance and the bound stays under the accountant's.
    assert dp["epsilon_lower_bound"] <= dp["accounted_epsilon"] and not dp["refuted"], dp
    assert dp["epsilon_lower_bound"] < plain["epsilon_lower_bound"]
    assert "| 0.500 | dp-sgd |" in (out / "audit.md").read_text() and (out / "audit.png").stat().st_size > 10_000
    assert "audit ε (lower, 95%)" in done.stdout

    # A DP run whose released model was in fact trained without noise: the audit refutes its accountant,
    # from the saved runs alone (no level reruns), and says so with exit status 1.
    shutil.copy(out / "eps-inf" / "checkpoints" / "last.safetensors", out / "eps-0.5" / "checkpoints")
    caught = run_fedtl(*args)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert caught.stdout.count("already run") == 2
    assert "passes the accounted epsilon at target 0.5" in caught.stdout
    dp = json.loads((out / "audit.json").read_text())["levels"][0]
    assert dp["refuted"] and dp["epsilon_lower_bound"] > dp["accounted_epsilon"]

    # Other guesses after seeing those scores: refused before anything is scored, naming the fixed ones.
    other = run_fedtl(*args, "--guesses", "30")
    assert other.returncode != 0 and "fixed its test before its first run" in other.stdout + other.stderr
    assert "--guesses 40" in other.stdout + other.stderr and "Traceback" not in other.stderr
