"""The wire contract is one module, and so is the run folder's: no literal copy of their names elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path
from types import ModuleType

import pytest

from fedtl import protocol, run_folder
from fedtl.models.transfer import TransferModel
from fedtl.protocol import HEAD, PROXIMAL_MU, RoundPlan

PACKAGE = Path(protocol.__file__).parent


def _names(module: ModuleType, marks: str) -> set[str]:
    """``module``'s upper-case string constants holding one of ``marks``: the names no other meaning could share."""
    return {v for k, v in vars(module).items()
            if k.isupper() and isinstance(v, str) and any(mark in v for mark in marks)}


# The wire's names hold a '-' or a '.' ("train-loss", "privacy.epsilon", "fedtl.local"); the run folder's a '_', a
# '.' or a '-' ("final_accuracy", "summary.json", "node-state"). Plain words ("accuracy", "arrays", "round") are
# both the wire's and the run folder's column names, and may stay literals.
DISTINCT = _names(protocol, "-.")
RUN_FOLDER_NAMES = _names(run_folder, "_.-")


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _copies(names: set[str], home: ModuleType, package: Path = PACKAGE) -> list[str]:
    """Every literal copy of one of ``names`` (docstrings aside) in ``package`` outside their ``home`` module."""
    return [f"{path.relative_to(package.parent)}:{line}: {value!r}"
            for path in sorted(package.rglob("*.py")) if path != Path(home.__file__)
            for line, value in _literals(path) if value in names]


def test_the_distinct_names_are_many() -> None:
    assert {"train-loss", "num-examples", "partition-id", "data-path", "privacy.epsilon", "fedtl.local"} <= DISTINCT
    assert {"metrics.jsonl", "summary.json", "plan.json", "node-state", "bytes_down", "lora_merge_error",
            "final_accuracy", "per_client", "accuracy_before_mean", "epsilon_max", "backbone_fingerprint",
            "target_accuracy"} <= RUN_FOLDER_NAMES


def test_no_wire_name_is_copied_outside_the_protocol() -> None:
    copies = _copies(DISTINCT, protocol)
    assert not copies, "use the name from fedtl.protocol: " + "; ".join(copies)


def test_no_run_folder_name_is_copied_outside_its_module() -> None:
    copies = _copies(RUN_FOLDER_NAMES, run_folder)
    assert not copies, "use the name from fedtl.run_folder: " + "; ".join(copies)


def test_a_copy_is_found(tmp_path: Path) -> None:
    package = tmp_path / "fedtl"
    package.mkdir()
    (package / "reader.py").write_text('"""Reads summary.json."""\n\nKEY = "final_accuracy"\nWORD = "accuracy"\n')
    assert _copies(RUN_FOLDER_NAMES, run_folder, package) == ["fedtl/reader.py:3: 'final_accuracy'"]


def test_the_plan_round_trips_through_its_config() -> None:
    plan = RoundPlan({"conv3": 0.01, HEAD: 0.1}, local_epochs=3)
    config = {**plan.to_config(), PROXIMAL_MU: 0.5}
    assert RoundPlan.from_config(config) == RoundPlan({"conv3": 0.01, HEAD: 0.1}, 3, 0.5)
    assert plan.without_head() == RoundPlan({"conv3": 0.01}, 3)
    with pytest.raises(ValueError, match="carries no valid plan"):
        RoundPlan.from_config({"plan.units": ["head"]})


def test_a_plan_applies_to_a_model() -> None:
    from fedtl.models.backbones import build_backbone

    model = TransferModel(build_backbone("small-cnn", 1), num_classes=3)
    RoundPlan({"conv2": 0.1}, 1).apply_to(model)
    assert model.trainable_units == ("conv2",)
