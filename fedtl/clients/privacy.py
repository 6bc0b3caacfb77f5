"""The client halves of the privacy modes (``fedtl.privacy``): a round of local training and a Flower mod.

One entry per privacy mode, under the same name; a test checks that every mode has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Context
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import Mod

from fedtl.clients.dp_sgd import dp_round
from fedtl.clients.trainer import TrainResult, train_local
from fedtl.config import ExperimentConfig
from fedtl.data.rows import LabelledImages
from fedtl.models.features import Feed
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from fedtl.registry import Registry

LocalRound = Callable[[TransferModel, LabelledImages, RoundPlan, ExperimentConfig, Context, int],
                      tuple[TrainResult, dict[str, float | int]]]
"""(model, data, plan, config, node context, seed) -> the round's result and the metrics it adds to the reply."""


@dataclass(frozen=True)
class ClientPrivacy:
    """A privacy mode's client half.

    Attributes
    ----------
    local_round : LocalRound
        Trains a client's round.
    client_mod : Callable[[ExperimentConfig], Mod | None]
        The Flower mod the ClientApp runs around training replies, if any.
    """

    local_round: LocalRound
    client_mod: Callable[[ExperimentConfig], Mod | None] = lambda cfg: None


def plain_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig,
                context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    """Local training as the plan says, nothing added to the reply."""
    return train_local(model, data, plan, cfg.finetune, seed=seed, how=Feed.of(cfg)), {}


def _dp_sgd_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig,
                  context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    return dp_round(model, data, plan, cfg, context, Feed.of(cfg))  # batch order and noise from OS entropy, not ``seed``


# The client-side half of Flower's client-level wrappers that clip on the client, by clipping.
_CLIPPING_MODS: dict[str, Mod] = {"fixed": fixedclipping_mod, "adaptive": adaptiveclipping_mod}


def _clipping_mod(cfg: ExperimentConfig) -> Mod | None:
    return _CLIPPING_MODS[cfg.privacy.clipping] if cfg.privacy.clip_on == "client" else None


CLIENT_PRIVACY: Registry[ClientPrivacy] = Registry("privacy mode (client half)")
CLIENT_PRIVACY.register("off")(ClientPrivacy(plain_round))
CLIENT_PRIVACY.register("dp-sgd")(ClientPrivacy(_dp_sgd_round))
CLIENT_PRIVACY.register("client-level")(ClientPrivacy(plain_round, _clipping_mod))


def client_privacy(cfg: ExperimentConfig) -> ClientPrivacy:
    """The client half of the privacy mode ``cfg`` names."""
    return CLIENT_PRIVACY.get(cfg.privacy.mode)
