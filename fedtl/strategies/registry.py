"""Flower strategies by name. A new strategy is one entry here (or in its own file).

Each entry's factory builds a ``flwr.serverapp.strategy`` object from the config; the
server then wraps it in ``TransferStrategy``, so every strategy sees only travelling
tensors. An entry may also refuse settings it cannot honour (``check_config``), which the
config runs when it is validated.
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

from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.privacy import privacy_mode, refused_per_sample
from fedtl.protocol import NUM_EXAMPLES, STEPS, TRAIN_LOSS, UNIT_WEIGHT
from fedtl.registry import Registry

StrategyFactory = Callable[[ExperimentConfig], Strategy]


def _accepts_any(cfg: ExperimentConfig) -> None:
    return None


@dataclass(frozen=True)
class StrategyEntry:
    """A strategy: its factory, the config check it adds (raises ``ConfigError``), and whether its aggregate
    is the weighted mean of the updates, FedAvg's (``averages``): the only rule client-level DP's noise is
    scaled to."""

    build: StrategyFactory
    check: Callable[[ExperimentConfig], None] = _accepts_any
    averages: bool = False

    def check_config(self, cfg: ExperimentConfig) -> None:
        """Refuse what this strategy cannot honour in ``cfg``."""
        if not self.averages and privacy_mode(cfg).noised_update:
            raise ConfigError(
                f"strategy.name = \"{cfg.strategy.name}\" with privacy.mode = \"{cfg.privacy.mode}\": the noise is "
                "scaled to the plain mean of clipped updates (one client moves it by at most C/m), and this "
                "strategy's aggregate moves the released model further for one client's change (a server optimiser "
                "or a robust rule, applied before the noise), so the accounted epsilon would not hold. Use "
                "strategy.name = \"fedavg\" or \"fedprox\" with client-level DP, or privacy.mode = \"dp-sgd\" "
                "with this strategy")
        self.check(cfg)


class StrategyRegistry(Registry[StrategyEntry]):
    """Strategies by name; registering a plain factory makes it an entry without checks."""

    def register(self, name: str, check_config: Callable[[ExperimentConfig], None] = _accepts_any,  # type: ignore[override]
                 *, averages: bool = False) -> Callable[[StrategyFactory], StrategyFactory]:
        return self.register_wrapped(name, lambda build: StrategyEntry(build, check_config, averages))


STRATEGIES = StrategyRegistry("strategy")
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
    # Evaluation is central, and the final client evaluation is TransferStrategy's own.
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


@STRATEGIES.register("fedprox", check_config=refused_per_sample(
    "strategy.name", "Opacus builds each update from per-sample gradients of the data loss, so FedProx's proximal term "
    "would be silently dropped. Use another strategy with DP-SGD, or FedProx without it"), averages=True)
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


def needs_sampled(least: Callable[[int], int], rule: str) -> Callable[[ExperimentConfig], None]:
    """A robust rule's check: a round samples at least ``least(num-malicious-nodes)`` clients, or its
    guarantee does not hold (Bulyan would skip every aggregation; Krum would pick among too few)."""
    def check(cfg: ExperimentConfig) -> None:
        f, n = cfg.strategy.num_malicious_nodes, cfg.sampled_clients
        if n < least(f):
            raise ConfigError(
                f"strategy.name = \"{cfg.strategy.name}\" with strategy.num-malicious-nodes = {f} needs at least "
                f"{least(f)} clients per round ({rule}); a round samples {n}. Add clients, raise "
                "strategy.fraction-train or min-train-nodes, or assume fewer malicious nodes")
    return check


_KRUM = needs_sampled(lambda f: 2 * f + 3, "Krum's n >= 2f + 3, Blanchard et al. 2017")


def _multikrum_check(cfg: ExperimentConfig) -> None:
    _KRUM(cfg)
    f, n, m = cfg.strategy.num_malicious_nodes, cfg.sampled_clients, cfg.strategy.num_nodes_to_select
    if m > n - f:
        raise ConfigError(f"strategy.num-nodes-to-select = {m} exceeds the {n - f} updates MultiKrum may select from "
                          f"{n} per round with {f} malicious: lower it")


@STRATEGIES.register("krum", check_config=_KRUM)
def krum(cfg: ExperimentConfig) -> Strategy:
    """Krum: the update closest to its neighbours, robust to ``num-malicious-nodes`` (Blanchard et al. 2017)."""
    return Krum(**common(cfg), num_malicious_nodes=cfg.strategy.num_malicious_nodes)


@STRATEGIES.register("multikrum", check_config=_multikrum_check)
def multikrum(cfg: ExperimentConfig) -> Strategy:
    """MultiKrum: the mean of the ``num-nodes-to-select`` updates Krum scores best."""
    s = cfg.strategy
    return MultiKrum(**common(cfg), num_malicious_nodes=s.num_malicious_nodes,
                     num_nodes_to_select=s.num_nodes_to_select)


@STRATEGIES.register("bulyan", check_config=needs_sampled(
    lambda f: 4 * f + 3, "Bulyan's n >= 4f + 3, El Mhamdi et al. 2018"))
def bulyan(cfg: ExperimentConfig) -> Strategy:
    """Bulyan: Krum selection, then a trimmed coordinate-wise mean (El Mhamdi et al. 2018)."""
    return Bulyan(**common(cfg), num_malicious_nodes=cfg.strategy.num_malicious_nodes)


@STRATEGIES.register("qfedavg", check_config=refused_per_sample(
    "strategy.name", "q-FedAvg weights each update by the client's training loss, which DP-SGD does not release "
    "(it is computed from the client's data without noise, so it would tell neighbouring data sets apart). Use "
    "another strategy with DP-SGD, or q-FedAvg without it"))
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
