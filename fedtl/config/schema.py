"""ExperimentConfig: the typed, validated description of one federated run.

One source of truth, parsed once: TOML file -> ``--set`` overrides -> frozen
dataclasses (each checks its fields on construction) -> flattened into Flower's
``run_config`` -> parsed back, identically, by the ServerApp and every ClientApp.

TOML keys are kebab-case (``local-epochs``), Python fields snake_case.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedtl.config.fields import ConfigError, Scalar, Validated, build, flatten, in_range, one_of, to_dict, unflatten


@dataclass(frozen=True)
class DataConfig(Validated):
    """Where each client's data comes from and how it is split."""

    SECTION = "data."

    scenario: str = field(default="digits-domain-shift", metadata=one_of("fedtl.data.scenarios:SCENARIOS"))
    partitioner: str = field(default="iid", metadata=one_of("fedtl.data.partition:PARTITIONERS"))
    alpha: float = field(default=0.5, metadata=in_range(0.0, None, lo_open=True))
    labelled_per_client: int = field(default=10, metadata=in_range(0))
    min_partition_size: int = field(default=2, metadata=in_range(0))
    test_fraction: float = field(default=0.3, metadata=in_range(0.0, 0.9, lo_open=True))
    image_size: int = field(default=16, metadata=in_range(8, 512))


@dataclass(frozen=True)
class ModelConfig(Validated):
    """Which backbone every client fine-tunes."""

    SECTION = "model."

    backbone: str = field(default="small-cnn", metadata=one_of("fedtl.models.backbones:BACKBONES"))


@dataclass(frozen=True)
class FinetuneConfig(Validated):
    """How clients fine-tune: the mode and its local optimisation."""

    SECTION = "finetune."

    mode: str = field(default="feature-extraction", metadata=one_of("fedtl.models.modes:MODES"))
    lr: float = field(default=0.05, metadata=in_range(0.0, 10.0, lo_open=True))
    backbone_lr_scale: float = field(default=0.1, metadata=in_range(0.0, 1.0, lo_open=True))
    lr_decay: float = field(default=0.5, metadata=in_range(0.0, 1.0, lo_open=True))
    unfreeze_every: int = field(default=3, metadata=in_range(1))
    local_epochs: int = field(default=2, metadata=in_range(1, 1000))
    batch_size: int = field(default=16, metadata=in_range(1))
    momentum: float = field(default=0.9, metadata=in_range(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=in_range(0.0, 1.0))


@dataclass(frozen=True)
class StrategyConfig(Validated):
    """How the server samples clients and merges what they trained."""

    SECTION = "strategy."

    name: str = field(default="fedavg", metadata=one_of("fedtl.strategies.registry:STRATEGIES"))
    fraction_train: float = field(default=1.0, metadata=in_range(0.0, 1.0, lo_open=True))
    min_train_nodes: int = field(default=2, metadata=in_range(1))
    min_available_nodes: int = field(default=2, metadata=in_range(1))
    round_timeout: float = field(default=3600.0, metadata=in_range(1.0))


@dataclass(frozen=True)
class PretrainConfig(Validated):
    """Pre-training of the built-in backbone on the scenario's source data."""

    SECTION = "pretrain."

    epochs: int = field(default=15, metadata=in_range(1, 1000))
    lr: float = field(default=0.05, metadata=in_range(0.0, 10.0, lo_open=True))
    batch_size: int = field(default=32, metadata=in_range(1))
    augment: bool = True
    seed: int = field(default=0, metadata=in_range(0))
    cache_dir: str = ".fedtl-cache"


@dataclass(frozen=True)
class SimulationConfig(Validated):
    """Resources of each virtual client in Flower's Ray simulation."""

    SECTION = "simulation."

    num_cpus: float = field(default=1.0, metadata=in_range(0.0, None, lo_open=True))
    num_gpus: float = field(default=0.0, metadata=in_range(0.0))


@dataclass(frozen=True)
class ExperimentConfig(Validated):
    """One federated transfer-learning run. Defaults are the offline default study."""

    name: str = "digits"
    seed: int = field(default=0, metadata=in_range(0))
    rounds: int = field(default=20, metadata=in_range(1, 100_000))
    clients: int = field(default=10, metadata=in_range(1, 100_000))
    init: str = field(default="pretrained", metadata=one_of(("pretrained", "scratch")))
    out: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy.min_available_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-available-nodes = {self.strategy.min_available_nodes} exceeds clients = "
                f"{self.clients}: the server would wait forever. Lower it or add clients."
            )
        if self.strategy.min_train_nodes > self.clients:
            raise ConfigError(
                f"strategy.min-train-nodes = {self.strategy.min_train_nodes} exceeds clients = {self.clients}. "
                "Lower it or add clients."
            )

    # -- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested dict with kebab-case keys, as in the TOML file."""
        return to_dict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML text (what a run folder's ``config.toml`` holds)."""
        return tomli_w.dumps(self.to_dict())

    def to_run_config(self) -> dict[str, Scalar]:
        """Flatten into Flower's ``run_config`` (``"finetune.mode": "full"``)."""
        return flatten(self.to_dict())

    @classmethod
    def from_run_config(cls, run_config: typing.Mapping[str, Any]) -> ExperimentConfig:
        """Parse a flattened Flower ``run_config`` back into a config (inverse of ``to_run_config``)."""
        return typing.cast(ExperimentConfig, build(cls, unflatten(dict(run_config)), cls))

    def as_scratch(self) -> ExperimentConfig:
        """The from-scratch baseline of this run: random init, every block trained at the head's lr."""
        finetune = dataclasses.replace(self.finetune, mode="full", backbone_lr_scale=1.0)
        return dataclasses.replace(self, init="scratch", finetune=finetune)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """Copy with top-level fields changed (validated on construction)."""
        return dataclasses.replace(self, **changes)
