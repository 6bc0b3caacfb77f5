"""The wire contract is one module: no literal copy of a wire name elsewhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedtl import protocol
from fedtl.models.transfer import TransferModel
from fedtl.protocol import HEAD, PROXIMAL_MU, RoundPlan

PACKAGE = Path(protocol.__file__).parent
# The names no other meaning could share: they hold a '-' or a '.' ("train-loss", "privacy.epsilon",
# "fedtl.local"). Plain words ("accuracy", "arrays") are also the run folder's column names.
DISTINCT = {v for k, v in vars(protocol).items() if k.isupper() and isinstance(v, str) and ("-" in v or "." in v)}


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_the_distinct_names_are_many() -> None:
    assert {"train-loss", "num-examples", "partition-id", "data-path", "privacy.epsilon", "fedtl.local"} <= DISTINCT


def test_no_wire_name_is_copied_outside_the_protocol() -> None:
    copies = [f"{path.relative_to(PACKAGE.parent)}:{line}: {value!r}"
              for path in sorted(PACKAGE.rglob("*.py")) if path.name != "protocol.py"
              for line, value in _literals(path) if value in DISTINCT]
    assert not copies, "use the name from fedtl.protocol: " + "; ".join(copies)


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
