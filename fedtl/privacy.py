"""Privacy modes by name: what a client does in a round, and what the server wraps its strategy in.

- ``off``: plain local training, plain strategy.
- ``dp-sgd``: sample-level DP; each client trains with Opacus and keeps its accountant
  for the whole run (``clients.dp_sgd``); the strategy is untouched.
- ``client-level``: plain local training; Flower's DP wrapper clips each client's
  update and noises the mean (``strategies.client_dp``), with Flower's RDP accountant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flwr.app import Context
from flwr.clientapp.typing import Mod
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import Strategy

from fedtl.clients.dp_sgd import DPConfigError, check_dp_plans, dp_round
from fedtl.clients.trainer import TrainResult, train_local
from fedtl.config import ExperimentConfig
from fedtl.data.federated import LabelledImages
from fedtl.models.transfer import TransferModel
from fedtl.registry import Registry
from fedtl.server.plan import RoundPlan
from fedtl.strategies.client_dp import CLIENT_MODS, wrap_client_level, wrapper_name

LocalRound = Callable[[TransferModel, LabelledImages, RoundPlan, ExperimentConfig, Context, int],
                      tuple[TrainResult, dict[str, float | int]]]
StrategyWrap = Callable[[Strategy, ExperimentConfig], tuple[Strategy, RdpAccountant | None]]


@dataclass(frozen=True)
class PrivacyMode:
    """One privacy mode's client and server halves.

    Attributes
    ----------
    level : str
        What one unit of protection is: ``"sample"``, ``"client"`` or ``"none"``.
    local_round : LocalRound
        Trains a client's round; returns its result and the metrics it adds to the reply.
    wrap : StrategyWrap
        Wraps the server's strategy; returns it and the server's accountant, if any.
    client_mod : Callable[[ExperimentConfig], Mod | None]
        The Flower mod the ClientApp runs around training, if any.
    check_plans : Callable[[TransferModel, Sequence[RoundPlan]], None]
        Run by the server before round one on every round's plan: refuses what the mode cannot train.
    """

    level: str
    local_round: LocalRound
    wrap: StrategyWrap
    client_mod: Callable[[ExperimentConfig], Mod | None]
    check_plans: Callable[[TransferModel, Sequence[RoundPlan]], None] = lambda model, plans: None


def _plain_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig,
                 context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    return train_local(model, data, plan, cfg.finetune, seed=seed), {}


def _dp_sgd_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig,
                  context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    return dp_round(model, data, plan, cfg, context)  # batch order and noise from OS entropy, not ``seed``


def check_client_level_plans(model: TransferModel, plans: Sequence[RoundPlan]) -> None:
    """Refuse BatchNorm statistics in the update under client-level DP: noised, a variance can turn negative.

    Raises
    ------
    DPConfigError
        If some round's travelling tensors include running means or variances.
    """
    for plan in plans:
        stats = [k for k in model.unit_keys(plan.lrs) if k.endswith(("running_mean", "running_var"))]
        if stats:
            raise DPConfigError(
                f"client-level DP would add noise to BatchNorm statistics ({', '.join(stats[:3])}, ...), which can "
                "make a variance negative. Freeze the norms (finetune.mode = \"feature-extraction\" or \"lora\"), "
                "or use GroupNorm (model.norm = \"group\", or the built-in small-cnn)")


PRIVACY_MODES: Registry[PrivacyMode] = Registry("privacy mode")
PRIVACY_MODES.register("off")(PrivacyMode("none", _plain_round, lambda s, cfg: (s, None), lambda cfg: None))
PRIVACY_MODES.register("dp-sgd")(PrivacyMode(
    "sample", _dp_sgd_round, lambda s, cfg: (s, None), lambda cfg: None, check_plans=check_dp_plans,
))
PRIVACY_MODES.register("client-level")(PrivacyMode(
    "client", _plain_round, wrap_client_level, lambda cfg: CLIENT_MODS.get(wrapper_name(cfg)),
    check_plans=check_client_level_plans,
))


def privacy_mode(cfg: ExperimentConfig) -> PrivacyMode:
    """The privacy mode ``cfg`` names."""
    return PRIVACY_MODES.get(cfg.privacy.mode)


__all__ = ["PRIVACY_MODES", "PrivacyMode", "privacy_mode"]
