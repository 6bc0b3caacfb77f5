"""Flower strategies by name. A new strategy is one factory here (or in its own file).

Each factory builds a ``flwr.serverapp.strategy`` object from the config; the server
then wraps it in ``TransferStrategy``, so every strategy sees only travelling tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, Strategy

from fedtl.config import ExperimentConfig
from fedtl.registry import Registry

StrategyFactory = Callable[[ExperimentConfig], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


@STRATEGIES.register("fedavg")
def fedavg(cfg: ExperimentConfig) -> Strategy:
    """Flower's FedAvg, weighted by each client's number of examples (McMahan et al. 2017)."""
    s = cfg.strategy
    # Evaluation is central (on the server's test set), so no federated evaluation round.
    return FedAvg(
        fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=0, min_available_nodes=s.min_available_nodes,
    )


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The Flower strategy named by ``cfg.strategy.name``."""
    return STRATEGIES.get(cfg.strategy.name)(cfg)
