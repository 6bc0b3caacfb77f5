"""Fine-tuning modes and the per-round plan, against hand-computed values."""

from __future__ import annotations

import dataclasses

import pytest

from fedtl.config import ExperimentConfig, FinetuneConfig
from fedtl.models.modes import MODES, plan_round, unfrozen_count
from fedtl.protocol import RoundPlan

BLOCKS = ("a", "b", "c")
FT = FinetuneConfig(lr=0.1, backbone_lr_scale=0.1, lr_decay=0.5, unfreeze_every=2)


def test_feature_extraction_trains_only_the_head() -> None:
    assert MODES.get("feature-extraction")(BLOCKS, 1, FT) == {"head": 0.1}


def test_full_trains_every_block_at_the_low_rate() -> None:
    assert MODES.get("full")(BLOCKS, 5, FT) == pytest.approx({"a": 0.01, "b": 0.01, "c": 0.01, "head": 0.1})


def test_discriminative_decays_from_the_top() -> None:
    # top block c is k=1: 0.1 * 0.5; b: 0.1 * 0.25; a: 0.1 * 0.125
    assert MODES.get("discriminative")(BLOCKS, 1, FT) == pytest.approx(
        {"a": 0.0125, "b": 0.025, "c": 0.05, "head": 0.1}
    )


def test_gradual_unfreezing_schedule() -> None:
    assert [unfrozen_count(3, r, 2) for r in range(1, 8)] == [1, 1, 2, 2, 3, 3, 3]
    assert [unfrozen_count(4, r, 1) for r in range(1, 6)] == [1, 2, 3, 4, 4]
    plans = [MODES.get("gradual-unfreezing")(BLOCKS, r, FT) for r in (1, 3, 5)]
    assert [sorted(p) for p in plans] == [["c", "head"], ["b", "c", "head"], ["a", "b", "c", "head"]]
    assert plans[2] == pytest.approx({"a": 0.01, "b": 0.01, "c": 0.01, "head": 0.1})


def test_plan_orders_units_input_to_output_and_round_trips() -> None:
    cfg = ExperimentConfig(finetune=dataclasses.replace(FT, mode="discriminative", local_epochs=3))
    plan = plan_round(cfg.finetune, BLOCKS, 1)
    assert list(plan.lrs) == ["a", "b", "c", "head"]
    assert plan.trainable_blocks == ("a", "b", "c") and plan.local_epochs == 3
    assert RoundPlan.from_config(plan.to_config()) == plan


def test_plan_from_a_foreign_config_is_refused() -> None:
    with pytest.raises(ValueError, match="carries no valid plan"):
        RoundPlan.from_config({"lr": 0.1})


def test_after_a_head_start_the_head_trains_at_its_scaled_rate_and_nothing_else_does() -> None:
    """FedNCM+FT: the class-means head is a good start; full-rate steps on each client's few images undid it."""
    ncm = dataclasses.replace(FT, mode="full", head_init="ncm", head_start_lr_scale=0.2)
    assert plan_round(ncm, BLOCKS, 1).lrs == pytest.approx({"a": 0.01, "b": 0.01, "c": 0.01, "head": 0.02})
    assert plan_round(dataclasses.replace(ncm, head_init="random"), BLOCKS, 1).lrs["head"] == pytest.approx(0.1)
