"""Personalisation: tensors that train on each client but never leave it.

A personalisation wraps the federation around whichever Flower strategy merges the rest:
- it names the model's *local keys* (``TransferModel.local_keys``), which the server
  leaves out of every message and each client keeps in its ``context.state``;
- it may change the round's plan (FedBABU freezes the head during federation) and the
  client's local round (FedRep trains the head first, then the body);
- a client's *personalised* model is the global model with its own local tensors (and,
  for FedBABU, a head it fine-tunes at evaluation): that is what its personalised
  accuracy measures, next to the global model's accuracy on the same images.

The server's central evaluation uses the server's values of local keys (their initial
ones): for FedPer/FedRep/FedBABU that is an untrained head, for FedBN the pre-trained
norms with federated weights around them, so read their personalised accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from flwr.app import ArrayRecord, Context

from fedtl.clients.trainer import TrainResult, train_local
from fedtl.config import ConfigError, ExperimentConfig
from fedtl.data.federated import LabelledImages
from fedtl.models.adapters import norm_keys
from fedtl.models.transfer import HEAD, TransferModel
from fedtl.registry import Registry
from fedtl.server.plan import RoundPlan, plan_round

LocalRound = Callable[[TransferModel, LabelledImages, RoundPlan, ExperimentConfig, Context, int],
                      tuple[TrainResult, dict[str, float | int]]]
# The node's ``context.state`` key under which its local tensors live between rounds.
LOCAL_STATE = "fedtl.local"


def _no_keys(model: TransferModel) -> frozenset[str]:
    return frozenset()


def _head_keys(model: TransferModel) -> frozenset[str]:
    return frozenset(k for k in model.state_dict() if k.startswith(f"{HEAD}."))


def _as_is(inner: LocalRound, model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig,
           context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    return inner(model, data, plan, cfg, context, seed)


@dataclass(frozen=True)
class Personalisation:
    """One personalisation scheme.

    Attributes
    ----------
    local : Callable[[TransferModel], frozenset[str]]
        The state keys that stay on each client.
    trains_head : bool
        Whether the head trains during federation (FedBABU: no).
    local_round : Callable
        ``(inner, model, data, plan, cfg, context, seed)``: the client's round around the
        privacy mode's own round ``inner``.
    tunes_head : bool
        Whether a client fine-tunes the head on its own data before its personalised evaluation.
    """

    local: Callable[[TransferModel], frozenset[str]] = _no_keys
    trains_head: bool = True
    local_round: Callable[..., tuple[TrainResult, dict[str, float | int]]] = _as_is
    tunes_head: bool = False


def head_plan(cfg: ExperimentConfig) -> RoundPlan:
    """The head alone at the head's rate ``finetune.lr``, for ``strategy.head-epochs`` (FedRep, FedBABU)."""
    return RoundPlan({HEAD: cfg.finetune.lr}, cfg.strategy.head_epochs)


def _fedrep_round(inner: LocalRound, model: TransferModel, data: LabelledImages, plan: RoundPlan,
                  cfg: ExperimentConfig, context: Context, seed: int) -> tuple[TrainResult, dict[str, float | int]]:
    # FedRep (Collins et al. 2021): the local head first adapts to the received body, then
    # the body trains under that head; only the body travels.
    head = head_plan(cfg)
    head.apply_to(model)
    train_local(model, data, head, cfg.finetune, seed=seed ^ 0x5EED)
    body = replace(plan, lrs={u: lr for u, lr in plan.lrs.items() if u != HEAD})
    body.apply_to(model)
    try:
        return inner(model, data, body, cfg, context, seed)
    finally:
        plan.apply_to(model)


PERSONALISATIONS: Registry[Personalisation] = Registry("personalisation")
PERSONALISATIONS.register("none")(Personalisation())
# FedPer (Arivazhagan et al. 2019): the body is federated, each client keeps its own head.
PERSONALISATIONS.register("fedper")(Personalisation(local=_head_keys))
# FedBN (Li et al. 2021): normalisation layers stay local, for feature-shifted silos.
PERSONALISATIONS.register("fedbn")(Personalisation(local=norm_keys))
PERSONALISATIONS.register("fedrep")(Personalisation(local=_head_keys, local_round=_fedrep_round))
# FedBABU (Oh et al. 2022): the head stays at its shared random init during federation;
# each client fine-tunes it on its own data at the end.
PERSONALISATIONS.register("fedbabu")(Personalisation(trains_head=False, tunes_head=True))


def personalisation(cfg: ExperimentConfig) -> Personalisation:
    """The personalisation ``cfg.strategy.personalisation`` names."""
    return PERSONALISATIONS.get(cfg.strategy.personalisation)


def personal_plan(cfg: ExperimentConfig, blocks: Sequence[str], rnd: int) -> RoundPlan:
    """The plan of round ``rnd`` under the run's personalisation (FedBABU: without the head)."""
    plan = plan_round(cfg, blocks, rnd)
    if personalisation(cfg).trains_head:
        return plan
    return replace(plan, lrs={u: lr for u, lr in plan.lrs.items() if u != HEAD})


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


def load_local_state(model: TransferModel, context: Context) -> None:
    """Load this node's local tensors (from earlier rounds) into ``model``; new keys keep their initial values."""
    if LOCAL_STATE in context.state.array_records:
        state = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
        model.load_some({k: v for k, v in state.items() if k in model.local_keys})


def save_local_state(model: TransferModel, context: Context, units: Sequence[str]) -> None:
    """Keep the local tensors ``units`` trained in this node's ``context.state`` (the others stay as they were)."""
    kept = model.state_of(model.kept_keys(units))
    if not kept:
        return
    record = context.state.array_records.get(LOCAL_STATE, ArrayRecord())
    merged = {**record.to_torch_state_dict(), **kept} if len(record) else kept
    context.state[LOCAL_STATE] = ArrayRecord(merged)
