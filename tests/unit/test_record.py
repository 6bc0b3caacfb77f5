"""The run folder: written round by round, never silently overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtl import run_folder
from fedtl.config import ExperimentConfig
from fedtl.errors import RunFolderError
from fedtl.reports.runs import read_metrics
from fedtl.server.record import RunRecorder
from fedtl.simulations.simulate import prepare_run_dir


def test_rows_checkpoints_and_summary(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path / "run", ExperimentConfig(rounds=2))
    rec.end_round(0, {"accuracy": 0.1, "loss": 2.3})
    rec.on_train(1, {"bytes_down": 100, "bytes_up": 90, "clients_ok": 2, "clients_failed": 1, "train_loss": 1.5})
    rec.end_round(1, {"accuracy": 0.6, "loss": 1.0, "accuracy/blur": 0.5})
    rec.on_train(2, {"bytes_down": 100, "bytes_up": 100, "clients_ok": 3, "clients_failed": 0})
    rec.end_round(2, {"accuracy": 0.5, "loss": 1.1, "accuracy/blur": 0.4})
    rec.checkpoint("last.safetensors", {"w": torch.ones(2)}, round=2)
    summary = rec.finish(total_params=7)

    rows = read_metrics(tmp_path / "run")  # lines were written as the rounds ended
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[1]["train_loss"] == 1.5
    assert summary["bytes_down_total"] == 200 and summary["bytes_up_total"] == 190
    assert (summary["final_accuracy"], summary["best_accuracy"], summary["best_round"]) == (0.5, 0.6, 1)
    assert summary["final_accuracy_per_style"] == {"blur": 0.4}
    named = {v for v in vars(run_folder).values() if isinstance(v, str)}  # every key a reader could copy is named
    assert {k for k in [*summary, *(k for r in rows for k in r)] if "_" in k} <= named
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["total_params"] == 7
    assert load_file(str(tmp_path / "run" / "checkpoints" / "last.safetensors"))["w"].tolist() == [1.0, 1.0]
    with pytest.raises(RunFolderError, match="already holds a run"):
        RunRecorder(tmp_path / "run", ExperimentConfig())


def test_overwrite_removes_only_what_a_run_writes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    RunRecorder(run, ExperimentConfig()).end_round(0, {"accuracy": 0.1, "loss": 2.0})
    (run / "notes.txt").write_text("mine")
    cfg = ExperimentConfig(out=str(run))
    with pytest.raises(RunFolderError, match="pass --overwrite"):
        prepare_run_dir(cfg)
    prepare_run_dir(cfg, overwrite=True)
    assert not (run / "metrics.jsonl").exists() and (run / "notes.txt").read_text() == "mine"


def test_a_refused_config_leaves_the_run_it_would_overwrite_as_it_was(tmp_path: Path) -> None:
    from fedtl.errors import DPConfigError
    from fedtl.simulations.simulate import simulate
    from tests.helpers import make_config

    run = tmp_path / "run"
    RunRecorder(run, ExperimentConfig()).end_round(0, {"accuracy": 0.1, "loss": 2.0})
    # BatchNorm trains under DP-SGD: refused by the preflight, before the folder is cleared.
    cfg = make_config("model.backbone=small-cnn-bn", "finetune.mode=full", "privacy.mode=dp-sgd", f"out={str(run)!r}")
    with pytest.raises(DPConfigError, match="DP-SGD cannot train BatchNorm"):
        simulate(cfg, overwrite=True)
    assert (run / "metrics.jsonl").read_text().strip() and not (run / "flower.log").exists()


def _strict(line: str) -> object:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_a_non_finite_value_is_written_as_json_null(tmp_path: Path) -> None:
    rec = RunRecorder(tmp_path / "run", ExperimentConfig(rounds=1))
    rec.end_round(0, {"accuracy": 0.1, "loss": 2.3})
    rec.on_train(1, {"bytes_down": 1, "bytes_up": 1, "clients_ok": 1, "clients_failed": 0, "train_loss": float("nan")})
    rec.end_round(1, {"accuracy": 0.2, "loss": float("inf")})
    rec.on_client_evaluation(1, [{"node-id": 1, "loss": float("nan")}])
    rec.finish(final_loss_extra=float("-inf"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    row = _strict(lines[1])
    assert row["train_loss"] is None and row["loss"] is None and row["accuracy"] == 0.2
    assert _strict((tmp_path / "run" / "clients.jsonl").read_text().splitlines()[0])["loss"] is None
    assert _strict((tmp_path / "run" / "summary.json").read_text())["final_loss_extra"] is None
