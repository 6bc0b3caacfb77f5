"""Scenarios: a source data set for pre-training and a target data set for federation.

A scenario returns the images unstyled; ``fedtl.data.federated`` applies each client's
domain style and the partitioning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from fedtl.config import DataConfig
from fedtl.data.digits import SOURCE_TARGET_SEED, digits_images, source_target_indices
from fedtl.registry import Registry


@dataclass(frozen=True)
class Scenario:
    """Source and target data of one transfer problem.

    Attributes
    ----------
    num_classes : int
        Classes of the target task (the head's outputs).
    source_classes : int
        Classes of the source task (the pre-training head's outputs).
    styles : tuple of str
        Domain styles of the target: client ``i`` gets ``styles[i % len(styles)]``, and
        test image ``j`` gets ``styles[j % len(styles)]``.
    """

    num_classes: int
    source_classes: int
    in_channels: int
    styles: tuple[str, ...]
    source_x: torch.Tensor
    source_y: torch.Tensor
    pool_x: torch.Tensor
    pool_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    # The client each pool item belongs to, where the data comes split by client (client folders).
    pool_groups: torch.Tensor | None = None


ScenarioFactory = Callable[[DataConfig], Scenario]
SCENARIOS: Registry[ScenarioFactory] = Registry("scenario")
DIGIT_STYLES = ("rotate", "blur", "low-contrast", "noise", "shear")


def _pool_test(idx: np.ndarray, labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    # Fixed seed: every run of a study is scored on the same test images.
    return train_test_split(idx, test_size=test_fraction, random_state=SOURCE_TARGET_SEED, stratify=labels[idx])


@SCENARIOS.register("digits-domain-shift")
def digits_domain_shift(cfg: DataConfig) -> Scenario:
    """Pre-train on clean source digits; each client holds target digits in its own style."""
    x, y = digits_images(cfg.image_size)
    source, target = source_target_indices()
    pool, test = _pool_test(target, y.numpy(), cfg.test_fraction)
    return Scenario(10, 10, 1, DIGIT_STYLES, x[source], y[source], x[pool], y[pool], x[test], y[test])


@SCENARIOS.register("digits-split-class")
def digits_split_class(cfg: DataConfig) -> Scenario:
    """Yosinski et al. (2014): pre-train on digits 0-4, fine-tune on 5-9 (relabelled 0-4), clean."""
    x, y = digits_images(cfg.image_size)
    source, target = source_target_indices()
    yn = y.numpy()
    source = source[yn[source] < 5]
    target = target[yn[target] >= 5]
    pool, test = _pool_test(target, yn, cfg.test_fraction)
    return Scenario(5, 5, 1, ("clean",), x[source], y[source], x[pool], y[pool] - 5, x[test], y[test] - 5)


def load_scenario(cfg: DataConfig) -> Scenario:
    """Build the scenario named by ``cfg.scenario``."""
    return SCENARIOS.get(cfg.scenario)(cfg)


# Real data sets register themselves in SCENARIOS too (after it exists: sources imports it).
from fedtl.data import nodes, sources, text  # noqa: E402, F401
