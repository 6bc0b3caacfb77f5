"""Personalisations: tensors that train on each client but never leave it; one registry entry each.

A personalisation wraps the federation around whichever Flower strategy merges the rest:
- it names the model's *local keys* (``TransferModel.local_keys``), which the server
  leaves out of every message and each client keeps in its ``context.state``;
- it may change the round's plan (FedBABU freezes the head during federation) and the
  client's local round (FedRep trains the head first, then the body);
- a client's *personalised* model is the global model with its own local tensors (and,
  for FedBABU, a head it fine-tunes at evaluation): that is what its personalised
  accuracy measures, next to the global model's accuracy on the same images.

An entry is a description both sides share (what stays local, the round's plan, the
checks of the model); the client's half (keeping the local tensors, FedRep's head phase,
FedBABU's tuning) is ``fedtl.clients.personal``, reading the entry's facts. The config knows
the personalisations without importing this module: their names and the facts it reads are
declared in ``fedtl.config.catalogue`` (this registry checks its entries against it), the
settings one refuses in other sections are ``fedtl.config.rules``.

The server's central evaluation uses the server's values of local keys (their initial
ones): for FedPer/FedRep/FedBABU that is an untrained head, for FedBN the pre-trained
norms with federated weights around them, so read their personalised accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtl.batchnorm import BATCHNORM
from fedtl.config import ExperimentConfig, catalogue
from fedtl.errors import ConfigError
from fedtl.models.modes import plan_round
from fedtl.protocol import HEAD, RoundPlan
from fedtl.registry import Registry

if TYPE_CHECKING:
    from fedtl.models.transfer import TransferModel


def _no_keys(model: TransferModel) -> frozenset[str]:
    return frozenset()


def _head_keys(model: TransferModel) -> frozenset[str]:
    return frozenset(k for k in model.state_dict() if k.startswith(f"{HEAD}."))


def _norm_keys(model: TransferModel) -> frozenset[str]:
    from fedtl.models.adapters import norm_keys  # lazily: this module stays light for the config

    return norm_keys(model)


def _lora_b_keys(model: TransferModel) -> frozenset[str]:
    """FedSA-LoRA's local keys: every trained LoRA B. Refuses a model whose A does not train too (nothing of
    the adapters would be federated) or that has no LoRA at all."""
    from fedtl.models.adapters import LORA_A, LORA_B  # lazily: this module stays light for the config

    trained = model.adapter_keys or frozenset()  # None: no adapter, so no LoRA
    b = frozenset(k for k in trained if LORA_B in k)
    if not b or not any(LORA_A in k for k in trained):
        raise ConfigError(
            "strategy.personalisation = \"fedsa-lora\" federates LoRA's A and keeps each client's B: it needs "
            f"finetune.mode = \"lora\" (this model trains {'no LoRA B' if not b else 'no LoRA A (ffa-lora freezes it)'})")
    return b


@dataclass(frozen=True)
class Personalisation:
    """One personalisation scheme.

    Attributes
    ----------
    local : Callable[[TransferModel], frozenset[str]]
        The state keys that stay on each client.
    trains_head : bool
        Whether the head trains during federation (FedBABU: no).
    head_first : bool
        Whether a client trains its (local) head alone before the body each round (FedRep).
    tunes_head : bool
        Whether a client fine-tunes the head on its own data before its personalised evaluation.
    lora_only : bool
        Whether it keeps LoRA tensors (FedSA-LoRA): a run's from-scratch baseline, which trains no LoRA,
        runs without it.
    batchnorm : str, optional
        The BatchNorm policy (``fedtl.batchnorm``) ``finetune.batchnorm = "auto"`` gives it (FedBN: local).
    """

    local: Callable[[TransferModel], frozenset[str]] = _no_keys
    trains_head: bool = True
    head_first: bool = False
    tunes_head: bool = False
    lora_only: bool = False
    batchnorm: str | None = None


def head_plan(cfg: ExperimentConfig) -> RoundPlan:
    """The head alone at the head's rate ``finetune.lr``, for ``strategy.head-epochs`` (FedRep, FedBABU)."""
    return RoundPlan({HEAD: cfg.finetune.lr}, cfg.strategy.head_epochs)


PERSONALISATIONS: Registry[Personalisation] = Registry("personalisation", declared=catalogue.PERSONALISATIONS)
PERSONALISATIONS.register("none")(Personalisation())
# FedPer (Arivazhagan et al. 2019): the body is federated, each client keeps its own head.
PERSONALISATIONS.register("fedper")(Personalisation(local=_head_keys))
# FedBN (Li et al. 2021): normalisation layers stay local, for feature-shifted silos.
PERSONALISATIONS.register("fedbn")(Personalisation(local=_norm_keys, batchnorm="local"))
# FedRep (Collins et al. 2021): the local head first adapts to the received body, then the
# body trains under that head; only the body travels.
PERSONALISATIONS.register("fedrep")(Personalisation(local=_head_keys, head_first=True))
# FedBABU (Oh et al. 2022): the head stays at its shared random init during federation;
# each client fine-tunes it on its own data at the end.
PERSONALISATIONS.register("fedbabu")(Personalisation(trains_head=False, tunes_head=True))


# FedSA-LoRA (Guo et al., ICLR 2025): A learns what the clients share and is averaged; each client's B, what
# is its own, never leaves it. The personalised model is the global A with the client's B.
PERSONALISATIONS.register("fedsa-lora")(Personalisation(local=_lora_b_keys, lora_only=True))


def personalisation(cfg: ExperimentConfig) -> Personalisation:
    """The personalisation ``cfg.strategy.personalisation`` names."""
    return PERSONALISATIONS.get(cfg.strategy.personalisation)


def run_model(cfg: ExperimentConfig, *, load_weights: bool = True) -> TransferModel:
    """The model a run trains: ``fedtl.models.factory.build_model`` (same arguments) with the run's BatchNorm
    policy applied and the local keys of ``cfg``'s personalisation set (and, where the policy keeps running
    statistics on the clients, those). Server and clients both build it so."""
    from fedtl.models.factory import build_model  # lazily: this module stays light for the config

    model = build_model(cfg, load_weights=load_weights)
    policy = BATCHNORM.get(cfg.finetune.batchnorm)
    model.set_batchnorm(policy)
    kept = model.statistics_keys() if policy.moves and not policy.travels else frozenset()
    model.local_keys = personalisation(cfg).local(model) | kept
    return model


def personal_plan(cfg: ExperimentConfig, blocks: Sequence[str], rnd: int) -> RoundPlan:
    """The plan of round ``rnd`` under the run's personalisation (FedBABU: without the head)."""
    plan = plan_round(cfg.finetune, blocks, rnd)
    return plan if personalisation(cfg).trains_head else plan.without_head()


def check_personal_plans(model: TransferModel, plans: Sequence[RoundPlan], name: str) -> None:
    """Refuse, before round one, a personalisation that leaves nothing to federate or nothing local.

    Raises
    ------
    ConfigError
        If some round's plan trains nothing that travels, or no round trains a local key.
    """
    kept = False
    for rnd, plan in enumerate(plans, start=1):
        units = list(plan.lrs)
        if not model.unit_keys(units):
            why = ("fedbabu freezes the head during federation and the mode trains nothing else" if not units else
                   f"the mode trains only {units} and {name} keeps that on the clients")
            raise ConfigError(
                f"strategy.personalisation = \"{name}\" leaves nothing to federate in round {rnd}: {why}. Use a mode "
                "that trains blocks (full, discriminative, gradual-unfreezing, lora, bn-only, bias-only)")
        kept = kept or bool(model.kept_keys(units))
    if model.local_keys and not kept:
        raise ConfigError(
            f"strategy.personalisation = \"{name}\" would keep nothing local: no round trains a tensor it keeps "
            "on the clients (FedBN needs trainable normalisation layers, e.g. finetune.mode = \"full\" or "
            "\"bn-only\"). Use strategy.personalisation = \"none\" for plain federation")
