"""Study files, plans and the results table, without running anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtl.errors import StudyError
from fedtl.models.metrics import expected_calibration_error
from fedtl.reports.interpret import confusion_matrix, saliency
from fedtl.reports.results import RunResult, compare_runs, to_target
from fedtl.server.record import client_summary
from fedtl.simulations.study import load_study, plan_study

GRID = """
[study]
name = "t"
seeds = [0, 1]
[study.set]
rounds = 3
[study.grid]
"finetune.mode" = ["feature-extraction", "full"]
partitioner = ["iid", "dirichlet"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_plan_covers_the_grid_and_shares_scratch_baselines(tmp_path: Path) -> None:
    spec = load_study(_write(tmp_path, GRID))
    assert spec.axes == (("finetune.mode", ("feature-extraction", "full")), ("data.partitioner", ("iid", "dirichlet")))
    runs = plan_study(spec, tmp_path / "out")
    assert len(runs) == 8 and {r.cfg.rounds for r in runs} == {3}
    assert {(r.values["finetune.mode"], r.values["data.partitioner"], r.seed) for r in runs} == {
        (m, p, s) for m in ("feature-extraction", "full") for p in ("iid", "dirichlet") for s in (0, 1)}
    assert len({r.cfg.out for r in runs}) == 8
    # Scratch is always "full" at one rate: the mode axis does not change the baseline.
    assert len({r.scratch.out for r in runs}) == 4
    assert all(r.scratch.init == "scratch" and r.scratch.seed == r.seed for r in runs)


@pytest.mark.parametrize(("text", "message"), [
    ("[other]\nx = 1\n", "no \\[study\\] table"),
    ("[study]\nsedes = [0]\n", "unknown \\[study\\] keys \\['sedes'\\]"),
    ("[study]\nseeds = []\n", "seeds must be a non-empty list"),
    ("[study]\n[study.grid]\nrounds = 3\n", "grid axis 'rounds' must be a non-empty list"),
    ("[study]\n[study.grid]\nmode = ['full']\n", "ambiguous"),
])
def test_bad_study_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(Exception, match=message):
        load_study(_write(tmp_path, text))


def test_an_invalid_grid_point_is_refused_before_anything_runs(tmp_path: Path) -> None:
    spec = load_study(_write(tmp_path, "[study]\n[study.grid]\nclients = [3, 1]\n"))
    with pytest.raises(StudyError, match=r"run clients=1 \(seed 0\): .*min-available-nodes = 2 exceeds clients = 1"):
        plan_study(spec, tmp_path / "out")


def test_refused_grid_points_are_skipped_and_listed_when_asked(tmp_path: Path) -> None:
    from fedtl.simulations.study import write_plan

    text = """
[study]
seeds = [0, 1]
{skip}
[study.grid]
"finetune.mode" = ["feature-extraction", "full"]
"strategy.personalisation" = ["none", "fedper"]
"""
    with pytest.raises(StudyError, match="personalisation=fedper \\(seed 0\\).*leaves nothing to federate"):
        plan_study(load_study(_write(tmp_path, text.format(skip=""))), tmp_path / "out")
    spec = load_study(_write(tmp_path, text.format(skip="skip-invalid = true")))
    runs = plan_study(spec, tmp_path / "out")
    assert len(runs) == 6 and len(runs.skipped) == 1  # listed once, not once per seed
    label, reason = runs.skipped[0]
    assert label == "finetune.mode=feature-extraction, strategy.personalisation=fedper" and "FedPer" not in label
    assert "leaves nothing to federate" in reason
    (tmp_path / "out").mkdir()
    plan = json.loads(write_plan(tmp_path / "out", spec, runs, "cmd").read_text())
    assert plan["skipped"] == [{"label": label, "reason": reason}]


def test_a_scratch_baseline_that_would_be_refused_fails_the_plan(tmp_path: Path) -> None:
    text = """
[study]
[study.set]
"privacy.mode" = "dp-sgd"
"model.backbone" = "small-cnn-bn"
"finetune.mode" = "lora"
"""
    with pytest.raises(StudyError, match="from-scratch baseline .* is refused: DP-SGD cannot train BatchNorm"):
        plan_study(load_study(_write(tmp_path, text)), tmp_path / "out")


def test_expected_calibration_error_by_hand() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 0])
    # One example per bin: gaps 0.1, 0.8, 0.3, 0.55, each weighing 1/4.
    assert expected_calibration_error(probs, labels) == pytest.approx((0.1 + 0.8 + 0.3 + 0.55) / 4)
    same_bin = torch.tensor([[0.9, 0.1], [0.91, 0.09]])
    assert expected_calibration_error(same_bin, torch.tensor([0, 1])) == pytest.approx(abs(0.5 - 0.905))


def test_saliency_of_a_linear_model_is_weight_times_input() -> None:
    linear = nn.Linear(4, 2)
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]])
    got = saliency(model, x, torch.tensor([1]))
    expected = (linear.weight[1].detach() * x.flatten()).reshape(1, 2, 2)
    torch.testing.assert_close(got, expected)
    assert linear.weight.grad is None


def test_confusion_matrix_by_hand() -> None:
    m = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_client_summary_worst_ten_percent() -> None:
    clients = [{"node-id": i, "partition-id": i, "held-out": 0, "accuracy": a}
               for i, a in enumerate([0.9, 0.8, 0.2, 0.7, 0.6, 0.5, 0.95, 0.85, 0.3, 0.75, 0.65, 0.55])]
    clients.append({"node-id": 99, "partition-id": 12, "held-out": 1, "accuracy-before": 0.4, "accuracy": 0.6})
    s = client_summary(clients)
    assert s["per_client"]["accuracy_worst10"] == pytest.approx((0.2 + 0.3) / 2)  # ceil(10 % of 12) = 2 clients
    assert len(s["per_client"]["accuracy"]) == 12 and s["held_out"]["ids"] == [12]
    assert (s["held_out"]["accuracy_before_mean"], s["held_out"]["accuracy_after_mean"]) == (0.4, 0.6)


def test_efficiency_to_target_and_compare(tmp_path: Path) -> None:
    rows = [{"round": 0, "accuracy": 0.1, "bytes_down": 0, "bytes_up": 0, "wall_seconds": 1.0},
            {"round": 1, "accuracy": 0.5, "bytes_down": 100, "bytes_up": 90, "wall_seconds": 2.0},
            {"round": 2, "accuracy": 0.8, "bytes_down": 100, "bytes_up": 90, "wall_seconds": 3.5}]
    run = RunResult("x", 0, tmp_path, {}, rows)
    assert to_target(run, 0.7) == {"round": 2, "seconds": 3.5, "bytes": 380}
    assert all(math.isnan(v) for v in to_target(run, 0.9).values())
    assert to_target(run, 0.05)["round"] == 1  # a random head's round 0 was not trained by anyone
    head_start = RunResult("x", 0, tmp_path, {}, [{**rows[0], "bytes_up": 50}, *rows[1:]])
    assert to_target(head_start, 0.05) == {"round": 0, "seconds": 1.0, "bytes": 50}  # the class sums were sent
    for name, acc in (("a", 0.5), ("b", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"final_accuracy": acc, "mode": "full"}))
    header, table = compare_runs(tmp_path / "a", tmp_path / "b")
    assert ["final_accuracy", "0.5000", "0.7500", "0.2500"] in table
    with pytest.raises(StudyError, match="holds no finished run"):
        compare_runs(tmp_path / "a", tmp_path / "missing")


def test_cases_go_together_and_multiply_the_grid(tmp_path: Path) -> None:
    text = GRID.replace('partitioner = ["iid", "dirichlet"]\n', "") + (
        '[[study.case]]\n"privacy.mode" = "off"\n'
        '[[study.case]]\n"privacy.mode" = "dp-sgd"\ntarget-epsilon = 3.0\n')
    runs = plan_study(load_study(_write(tmp_path, text)), tmp_path / "out")
    assert len(runs) == 2 * 2 * 2
    labels = sorted({r.label for r in runs})
    assert "privacy.mode=dp-sgd, privacy.target-epsilon=3.0, finetune.mode=full" in labels
    assert all((r.cfg.privacy.target_epsilon == 3.0) == (r.cfg.privacy.mode == "dp-sgd") for r in runs)


def test_a_study_table_shows_epsilon_under_each_accountant_where_runs_have_it(tmp_path: Path) -> None:
    from fedtl.reports.results import StudyResults, table

    rows = [{"round": 1, "accuracy": 0.5, "bytes_down": 1, "bytes_up": 1, "seconds": 1.0}]
    totals = {"bytes_down_total": 1, "bytes_up_total": 1}
    dp = {**totals, "final_accuracy": 0.5, "privacy": {"epsilon_max": 3.3, "epsilon_max_by_accountant": {
        "rdp": 3.3, "prv": 3.07, "gdp": 2.99}, "epsilon_max_tightest": 3.1}}
    res = StudyResults("s", "", tmp_path, 0.0, {
        "dp": [RunResult("dp", 0, tmp_path, dp, rows)],
        "off": [RunResult("off", 0, tmp_path, {**totals, "final_accuracy": 0.9, "privacy": {"epsilon_max": None}}, rows)]})
    header, cells = table(res)
    at = {h: i for i, h in enumerate(header)}
    assert [cells[0][at[h]] for h in ("epsilon", "ε ≤ (RDP)", "ε ≤ (PRV)", "ε ≈ (GDP)", "ε ≤ (tighter of RDP, PRV)")] \
        == ["3.3", "3.3", "3.07", "2.99", "3.1"]
    assert [cells[1][at[h]] for h in ("epsilon", "ε ≤ (RDP)", "ε ≤ (PRV)")] == ["∞", "—", "—"]
    res.configs.pop("dp")
    assert "ε ≤ (PRV)" not in table(res)[0]  # no run has it: no column


def test_cells_say_how_many_seeds_a_figure_covers() -> None:
    from fedtl.reports.results import _cell

    assert _cell([1.0, 3.0], "{:.1f}") == "2.0 ± 1.4"
    assert _cell([2.0, math.nan, math.nan], "{:.1f}") == "2.0 (1/3 seeds)"
    assert _cell([math.nan], "{:.1f}") == "—" and _cell([math.inf, math.inf], "{:.3g}") == "∞"
