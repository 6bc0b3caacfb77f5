"""Flower strategies by name. A new strategy is one factory here (or in its own file).

Each factory builds a ``flwr.serverapp.strategy`` object from the config; the server
then wraps it in ``TransferStrategy``, so every strategy sees only travelling tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedtl.config import ExperimentConfig
from fedtl.registry import Registry
from fedtl.server.plan import UNIT_WEIGHT

StrategyFactory = Callable[[ExperimentConfig], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")
_WEIGHT_KEYS = {"examples": "num-examples", "uniform": UNIT_WEIGHT}


# Only these reply metrics are averaged over clients. Never epsilons: each client's data has
# its own guarantee, which the privacy ledger keeps per client. Nor ids.
AVERAGED_METRICS = ("train-loss", "steps")


def average_training_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted average of the replies' ``AVERAGED_METRICS`` (the rest stay per client)."""
    keep = {*AVERAGED_METRICS, weighting_metric_name}
    trimmed = [RecordDict({name: MetricRecord({k: v for k, v in m.items() if k in keep})
                           for name, m in r.metric_records.items()}) for r in records]
    return aggregate_metricrecords(trimmed, weighting_metric_name)


def weight_key(cfg: ExperimentConfig) -> str:
    """The reply metric clients are weighted by (``strategy.weighting``; "auto": uniform under client-level DP)."""
    weighting = cfg.strategy.weighting
    if weighting == "auto":
        weighting = "uniform" if cfg.privacy.mode == "client-level" else "examples"
    return _WEIGHT_KEYS[weighting]


@STRATEGIES.register("fedavg")
def fedavg(cfg: ExperimentConfig) -> Strategy:
    """Flower's FedAvg, weighted by each client's number of examples (McMahan et al. 2017)."""
    s = cfg.strategy
    # Evaluation is central (on the server's test set), so no federated evaluation round.
    return FedAvg(
        fraction_train=s.fraction_train, fraction_evaluate=0.0, min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=0, min_available_nodes=s.min_available_nodes, weighted_by_key=weight_key(cfg),
        train_metrics_aggr_fn=average_training_metrics,
    )


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The Flower strategy named by ``cfg.strategy.name``."""
    return STRATEGIES.get(cfg.strategy.name)(cfg)
