"""Scenarios: a source data set for pre-training and a target data set for federation.

A scenario returns the images unstyled; ``fedtl.data.federated`` applies each client's
domain style and the partitioning. This module holds the registry; the families register
themselves in their own modules (``digits``, ``sources``, ``text``, ``nodes``), which
``fedtl.data`` imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedtl.config import DataConfig
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


def load_scenario(cfg: DataConfig) -> Scenario:
    """Build the scenario named by ``cfg.scenario``."""
    return SCENARIOS.get(cfg.scenario)(cfg)
