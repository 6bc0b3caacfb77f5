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
from fedtl.clients.spend import NodeState
from fedtl.clients.trainer import TrainResult, train_local
from fedtl.config import ExperimentConfig, FinetuneConfig, PrivacyConfig
from fedtl.data.rows import LabelledImages
from fedtl.models.features import Feed
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from fedtl.registry import Registry


@dataclass(frozen=True)
class RoundInputs:
    """What a client's round reads besides its model, data, plan and seed: the config sections it uses and the
    node's own state, not the whole config nor Flower's Context.

    Attributes
    ----------
    finetune : FinetuneConfig
        Batch size, momentum and weight decay.
    privacy : PrivacyConfig
        The privacy mode's settings (DP-SGD: noise, clipping, accountant, budget).
    rounds : int
        The run's planned rounds: ``privacy.target-epsilon`` calibrates a DP-SGD client's noise over them all.
    feed : Feed
        The run's feature cache and augmentation.
    node : NodeState
        The node's records for the run and its owner's node config (DP-SGD: its spend, cap and state folder).
    """

    finetune: FinetuneConfig
    privacy: PrivacyConfig
    rounds: int
    feed: Feed
    node: NodeState

    @classmethod
    def of(cls, cfg: ExperimentConfig, context: Context) -> RoundInputs:
        """The inputs of a round of ``cfg``'s run on the node of ``context``."""
        return cls(cfg.finetune, cfg.privacy, cfg.rounds, Feed.of(cfg), NodeState.of(context))


LocalRound = Callable[[TransferModel, LabelledImages, RoundPlan, RoundInputs, int],
                      tuple[TrainResult, dict[str, float | int]]]
"""(model, data, plan, inputs, seed) -> the round's result and the metrics it adds to the reply."""


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


def plain_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, inputs: RoundInputs,
                seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    """Local training as the plan says, nothing added to the reply."""
    return train_local(model, data, plan, inputs.finetune, seed=seed, feed=inputs.feed), {}


def _dp_sgd_round(model: TransferModel, data: LabelledImages, plan: RoundPlan, inputs: RoundInputs,
                  seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    # Batch order and noise from OS entropy, not ``seed``.
    return dp_round(model, data, plan, inputs.finetune, inputs.privacy, rounds=inputs.rounds, node=inputs.node,
                    feed=inputs.feed)


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
