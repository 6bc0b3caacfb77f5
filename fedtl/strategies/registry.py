"""Flower strategies by name. A new strategy is one entry here (or in its own file).

Each entry's factory builds a ``flwr.serverapp.strategy`` object from the config; the
server then wraps it in the transfer strategy's wrappers, so every strategy sees only travelling
tensors. The settings an entry cannot honour (FedProx under DP-SGD, Krum with too few
clients per round) are the config's rules (``fedtl.config.rules``), which it runs when it is
validated; the facts they read are declared in ``fedtl.config.catalogue``, which this registry
checks its entries against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedtl.config import ExperimentConfig, catalogue
from fedtl.privacy import privacy_mode
from fedtl.protocol import NUM_EXAMPLES, STEPS, TRAIN_LOSS, UNIT_WEIGHT
from fedtl.registry import Registry

StrategyFactory = Callable[[ExperimentConfig], Strategy]


@dataclass(frozen=True)
class StrategyEntry:
    """A strategy: its factory, and whether its aggregate is the weighted mean of the updates, FedAvg's
    (``averages``): the only rule client-level DP's noise is scaled to."""

    build: StrategyFactory
    averages: bool = False


class StrategyRegistry(Registry[StrategyEntry]):
    """Strategies by name; registering a plain factory makes it an entry."""

    def register(self, name: str, *, averages: bool = False  # type: ignore[override]
                 ) -> Callable[[StrategyFactory], StrategyFactory]:
        return self.register_wrapped(name, lambda build: StrategyEntry(build, averages))


STRATEGIES = StrategyRegistry("strategy", declared=catalogue.STRATEGIES)
_WEIGHT_KEYS = {"examples": NUM_EXAMPLES, "uniform": UNIT_WEIGHT}
# Only these reply metrics are averaged over clients. Never epsilons: each client's data has
# its own guarantee, which the privacy ledger keeps per client. Nor ids.
AVERAGED_METRICS = (TRAIN_LOSS, STEPS)


def average_training_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted average of the replies' ``AVERAGED_METRICS`` (the rest stay per client)."""
    keep = {*AVERAGED_METRICS, weighting_metric_name}
    trimmed = [RecordDict({name: MetricRecord({k: v for k, v in m.items() if k in keep})
                           for name, m in r.metric_records.items()}) for r in records]
    return aggregate_metricrecords(trimmed, weighting_metric_name)


def weight_key(cfg: ExperimentConfig) -> str:
    """The reply metric clients are weighted by (``strategy.weighting``; "auto": uniform where the privacy
    mode's noise is calibrated to equal weights, client-level DP, else by examples)."""
    weighting = cfg.strategy.weighting
    if weighting == "auto":
        weighting = "uniform" if privacy_mode(cfg).uniform_weights else "examples"
    return _WEIGHT_KEYS[weighting]


def common(cfg: ExperimentConfig) -> dict[str, Any]:
    """What every Flower strategy takes from the config: sampling, minimums, weighting, metrics."""
    s = cfg.strategy
    # Evaluation is central, and the final client evaluation is FinalEvaluation's (fedtl.strategies.evaluation).
    return {
        "fraction_train": s.fraction_train, "fraction_evaluate": 0.0, "min_train_nodes": s.min_train_nodes,
        "min_evaluate_nodes": 0, "min_available_nodes": s.min_available_nodes, "weighted_by_key": weight_key(cfg),
        "train_metrics_aggr_fn": average_training_metrics,
    }


def _server_lr(cfg: ExperimentConfig, default: float) -> float:
    return cfg.strategy.server_lr or default  # 0: the strategy's own default


@STRATEGIES.register("fedavg", averages=True)
def fedavg(cfg: ExperimentConfig) -> Strategy:
    """FedAvg: the mean of client updates weighted by examples (McMahan et al. 2017)."""
    return FedAvg(**common(cfg))


@STRATEGIES.register("fedprox", averages=True)
def fedprox(cfg: ExperimentConfig) -> Strategy:
    """FedProx: FedAvg, with clients adding (mu/2)||w - w_global||^2 to their loss (Li et al. 2020)."""
    return FedProx(**common(cfg), proximal_mu=cfg.strategy.proximal_mu)


def _fedopt(cls: type, *params: str) -> StrategyFactory:
    def build(cfg: ExperimentConfig) -> Strategy:
        s = cfg.strategy
        return cls(**common(cfg), eta=_server_lr(cfg, 0.1), eta_l=cfg.finetune.lr, tau=s.tau,
                   **{k: getattr(s, k) for k in params})
    build.__doc__ = f"{cls.__name__}: the mean update as a pseudo-gradient of a server-side optimiser (Reddi et al. 2021)."
    return build


STRATEGIES.register("fedadam")(_fedopt(FedAdam, "beta_1", "beta_2"))
STRATEGIES.register("fedyogi")(_fedopt(FedYogi, "beta_1", "beta_2"))
STRATEGIES.register("fedadagrad")(_fedopt(FedAdagrad))


@STRATEGIES.register("fedavgm")
def fedavgm(cfg: ExperimentConfig) -> Strategy:
    """FedAvgM: FedAvg with server momentum on the mean update (Hsu et al. 2019)."""
    return FedAvgM(**common(cfg), server_learning_rate=_server_lr(cfg, 1.0),
                   server_momentum=cfg.strategy.server_momentum)


@STRATEGIES.register("fedmedian")
def fedmedian(cfg: ExperimentConfig) -> Strategy:
    """FedMedian: the coordinate-wise median of client updates (Yin et al. 2018)."""
    return FedMedian(**common(cfg))


@STRATEGIES.register("fedtrimmedavg")
def fedtrimmedavg(cfg: ExperimentConfig) -> Strategy:
    """FedTrimmedAvg: the coordinate-wise mean without the ``trim-beta`` extremes on each side."""
    return FedTrimmedAvg(**common(cfg), beta=cfg.strategy.trim_beta)


@STRATEGIES.register("krum")
def krum(cfg: ExperimentConfig) -> Strategy:
    """Krum: the update closest to its neighbours, robust to ``num-malicious-nodes`` (Blanchard et al. 2017)."""
    return Krum(**common(cfg), num_malicious_nodes=cfg.strategy.num_malicious_nodes)


@STRATEGIES.register("multikrum")
def multikrum(cfg: ExperimentConfig) -> Strategy:
    """MultiKrum: the mean of the ``num-nodes-to-select`` updates Krum scores best."""
    s = cfg.strategy
    return MultiKrum(**common(cfg), num_malicious_nodes=s.num_malicious_nodes,
                     num_nodes_to_select=s.num_nodes_to_select)


@STRATEGIES.register("bulyan")
def bulyan(cfg: ExperimentConfig) -> Strategy:
    """Bulyan: Krum selection, then a trimmed coordinate-wise mean (El Mhamdi et al. 2018)."""
    return Bulyan(**common(cfg), num_malicious_nodes=cfg.strategy.num_malicious_nodes)


@STRATEGIES.register("qfedavg")
def qfedavg(cfg: ExperimentConfig) -> Strategy:
    """q-FedAvg: fairness-weighted averaging by clients' training loss to the power ``q`` (Li et al. 2020)."""
    return QFedAvg(**common(cfg), client_learning_rate=cfg.finetune.lr, q=cfg.strategy.q,
                   train_loss_key=TRAIN_LOSS)


def steps_server_optimiser(strategy: Strategy) -> bool:
    """Whether ``strategy`` moves the model by a server optimiser's step (FedAdam/Yogi/Adagrad,
    FedAvgM, q-FedAvg) rather than by a statistic of the updates (mean, median, Krum...)."""
    return isinstance(strategy, (FedOpt, FedAvgM, QFedAvg))


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The Flower strategy named by ``cfg.strategy.name``."""
    return STRATEGIES.get(cfg.strategy.name).build(cfg)
