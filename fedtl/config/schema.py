"""ExperimentConfig: the typed, validated description of one federated run.

One source of truth, parsed once: TOML file -> ``--set`` overrides -> frozen
dataclasses (each checks its fields on construction) -> flattened into Flower's
``run_config`` -> parsed back, identically, by the ServerApp and every ClientApp.

TOML keys are kebab-case (``local-epochs``), Python fields snake_case. The sections are
``sections.py``; the rules a chosen registry entry adds across them, ``rules.py``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedtl.batchnorm import AUTO
from fedtl.config import catalogue
from fedtl.config.fields import ConfigError, Scalar, Validated, build, flatten, in_range, one_of, to_dict, unflatten
from fedtl.config.rules import rules_of
from fedtl.config.sections import (
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    PrivacyConfig,
    SimulationConfig,
    StrategyConfig,
)


@dataclass(frozen=True)
class ExperimentConfig(Validated):
    """One federated transfer-learning run. Defaults are the offline default study."""

    # Run name (default folder `runs/<name>-<time>`).
    name: str = "digits"
    # Seed of the client split, head init, scratch init, batch order.
    seed: int = field(default=0, metadata=in_range(0))
    # Federated rounds.
    rounds: int = field(default=20, metadata=in_range(1, 100_000))
    # Simulated clients (SuperNodes); in a deployment, the nodes the run expects.
    clients: int = field(default=10, metadata=in_range(1, 100_000))
    # Start from the pre-trained backbone or random weights.
    init: str = field(default="pretrained", metadata=one_of(("pretrained", "scratch")))
    # Run folder (`--out` sets it).
    out: str = ""
    # Write the resume checkpoint every this many rounds, and after the last (`fedtl simulate --resume`); 0: never.
    checkpoint_every: int = field(default=1, metadata=in_range(0))
    # Where clients train and evaluate: "auto" (CUDA when this process sees a GPU), "cpu" or "cuda".
    # A node's own node config "device" overrides it.
    device: str = field(default="auto", metadata=one_of(catalogue.DEVICES))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
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
        training = self.training_clients
        if training < 1:
            raise ConfigError(f"data.held-out-clients = {self.data.held_out_clients} leaves no client of {self.clients} "
                              "to train: hold out fewer clients or add clients")
        if self.data.held_out_clients and max(self.strategy.min_train_nodes, self.strategy.min_available_nodes) > training:
            raise ConfigError(
                f"with data.held-out-clients = {self.data.held_out_clients}, only {training} clients train, fewer than "
                f"strategy.min-train-nodes / min-available-nodes ({self.strategy.min_train_nodes} / "
                f"{self.strategy.min_available_nodes}): lower those or hold out fewer clients"
            )
        if self.data.canaries and self.data.canary_client >= training:
            raise ConfigError(f"data.canary-client = {self.data.canary_client} is not a training client (0 to "
                              f"{training - 1}): the canaries would never be trained on; name one of those")
        p = self.privacy
        if p.max_epsilon and p.target_epsilon and p.max_epsilon < p.target_epsilon:
            raise ConfigError(
                f"privacy.max-epsilon = {p.max_epsilon} is below privacy.target-epsilon = {p.target_epsilon}: the run "
                "could not finish its plan. Raise max-epsilon or lower target-epsilon (or leave max-epsilon at 0)."
            )
        if self.finetune.batchnorm == AUTO:  # resolved once, so config.toml records what the run does
            object.__setattr__(self, "finetune", dataclasses.replace(self.finetune, batchnorm=self._auto_batchnorm()))
        for rule in rules_of(self):  # what the chosen strategy, personalisation, LoRA merge and privacy mode refuse
            rule(self)

    def _auto_batchnorm(self) -> str:
        """``finetune.batchnorm = "auto"``: the personalisation's own policy (FedBN: local), else batch statistics
        from scratch, else the mode's own (bn-only: batch), else frozen statistics (fedtl.batchnorm)."""
        own = catalogue.PERSONALISATIONS.get(self.strategy.personalisation).batchnorm
        if own is None and self.init == "scratch":
            own = "batch"
        return own or catalogue.MODES.get(self.finetune.mode).batchnorm or "frozen"

    @property
    def training_clients(self) -> int:
        """Clients that train: all but the held-out ones."""
        return self.clients - self.data.held_out_clients

    @property
    def sampled_clients(self) -> int:
        """Clients the strategy samples each round when all training clients are available (Flower's rule)."""
        n = self.training_clients
        return min(n, max(int(n * self.strategy.fraction_train), self.strategy.min_train_nodes))

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
        """The from-scratch baseline of this run: random init, every block trained at the head's lr, a seeded
        random head (a head start needs pre-trained features), BatchNorm as ``auto`` chooses from scratch (batch
        statistics, merged: how the architecture trains from random init). It trains no LoRA, so how LoRA is
        merged (and a personalisation of LoRA's tensors, FedSA-LoRA: ``lora_only``) goes back to the default."""
        finetune = dataclasses.replace(self.finetune, mode="full", backbone_lr_scale=1.0, head_init="random",
                                       lora_ranks="", batchnorm=AUTO)
        lora_only = catalogue.PERSONALISATIONS.get(self.strategy.personalisation).lora_only
        strategy = dataclasses.replace(self.strategy, lora_merge="average",
                                       personalisation="none" if lora_only else self.strategy.personalisation)
        return dataclasses.replace(self, init="scratch", finetune=finetune, strategy=strategy)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """Copy with top-level fields changed (validated on construction)."""
        return dataclasses.replace(self, **changes)
