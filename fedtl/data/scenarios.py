"""Scenarios: a source data set for pre-training and a target data set for federation.

A scenario returns the images unstyled; ``fedtl.data.federated`` applies each client's
domain style and the partitioning. This module holds the registry; the families register
themselves in their own modules (``digits``, ``sources``, ``text``, ``nodes``), which
``fedtl.data`` imports. ``load_scenario`` runs a family once per machine: its arrays go into
the data store (``fedtl.data.store``) and every process maps them from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedtl.config import DataConfig, catalogue
from fedtl.data.store import Writer, files_fingerprint, open_arrays
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
    # Its data store entry (empty: not stored); names its rows in the feature cache's keys.
    key: str = ""


ScenarioFactory = Callable[[DataConfig], Scenario]
SCENARIOS: Registry[ScenarioFactory] = Registry("scenario", declared=catalogue.SCENARIOS)
DIGIT_STYLES = ("rotate", "blur", "low-contrast", "noise", "shear")


# Fields that say how the scenario is split or used, not what its arrays hold: left out of its store key.
_NOT_IN_KEY = ("partitioner", "alpha", "labelled_per_client", "min_partition_size", "client_test_fraction",
               "held_out_clients", "store_dir", "augment", "canaries", "canary_client")
_ARRAYS = ("source_x", "source_y", "pool_x", "pool_y", "test_x", "test_y", "pool_groups")


def scenario_key(cfg: DataConfig) -> dict[str, Any]:
    """What a scenario's arrays come from: its data settings and the names, sizes and times of its files."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    files = [p for p in (cfg.path, cfg.root) if p]
    return {"kind": "scenario", "data": fields, "files": files_fingerprint(files) if files else ""}


def _write(sc: Scenario, w: Writer) -> Mapping[str, Any]:
    for name in _ARRAYS:
        value = getattr(sc, name)
        if value is not None:
            w.put(name, value.contiguous())
    return {"num_classes": sc.num_classes, "source_classes": sc.source_classes, "in_channels": sc.in_channels,
            "styles": list(sc.styles)}


def load_scenario(cfg: DataConfig, *, verify: bool = False) -> Scenario:
    """The scenario named by ``cfg.scenario``, from the data store (``data.store-dir``): built there by its
    family once per machine, mapped by every process (``verify``: check the files' hashes first)."""
    family = SCENARIOS.get(cfg.scenario)
    stored = open_arrays(cfg.store_dir, scenario_key(cfg), lambda w: _write(family(cfg), w), verify=verify)
    a, info = stored.arrays, stored.info
    return Scenario(info["num_classes"], info["source_classes"], info["in_channels"], tuple(info["styles"]),
                    a["source_x"], a["source_y"], a["pool_x"], a["pool_y"], a["test_x"], a["test_y"],
                    a.get("pool_groups"), key=stored.key)
