"""The client half of personalisation (``fedtl.personalisation``): local tensors kept between rounds,
FedRep's head phase, and the personalised model a node evaluates."""

from __future__ import annotations

import copy

from flwr.app import ArrayRecord, Context

from fedtl.clients.privacy import LocalRound, RoundInputs
from fedtl.clients.trainer import TrainResult, train_local
from fedtl.config import ExperimentConfig
from fedtl.data.rows import LabelledImages
from fedtl.models.features import Feed
from fedtl.models.transfer import TransferModel
from fedtl.personalisation import head_plan, personalisation
from fedtl.protocol import LOCAL_STATE, RoundPlan


def head_phase(cfg: ExperimentConfig) -> RoundPlan | None:
    """The plan of the head's own phase before each round (FedRep, ``head_first``), or ``None``."""
    return head_plan(cfg) if personalisation(cfg).head_first else None


def local_round(inner: LocalRound, model: TransferModel, data: LabelledImages, plan: RoundPlan,
                inputs: RoundInputs, seed: int, *, head: RoundPlan | None = None,
                ) -> tuple[TrainResult, dict[str, float | int]]:
    """The client's round around the privacy mode's own round ``inner``: as it is, or (``head``, FedRep's
    ``head_phase``) the head alone first, then the body under it with the head frozen."""
    if head is None:
        return inner(model, data, plan, inputs, seed)
    head.apply_to(model)
    train_local(model, data, head, inputs.finetune, seed=seed ^ 0x5EED, feed=inputs.feed)
    body = plan.without_head()
    body.apply_to(model)
    try:
        return inner(model, data, body, inputs, seed)
    finally:
        plan.apply_to(model)


def load_local_state(model: TransferModel, context: Context) -> None:
    """Load this node's local tensors (from earlier rounds) into ``model``; new keys keep their initial values."""
    if LOCAL_STATE in context.state.array_records:
        state = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
        model.load_some({k: v for k, v in state.items() if k in model.local_keys})


def save_local_state(model: TransferModel, context: Context, units: list[str]) -> None:
    """Keep the local tensors ``units`` trained in this node's ``context.state`` (the others stay as they were)."""
    kept = model.state_of(model.kept_keys(units))
    if not kept:
        return
    record = context.state.array_records.get(LOCAL_STATE, ArrayRecord())
    merged = {**record.to_torch_state_dict(), **kept} if len(record) else kept
    context.state[LOCAL_STATE] = ArrayRecord(merged)


def personalised_model(model: TransferModel, context: Context, cfg: ExperimentConfig,
                       data: LabelledImages, seed: int) -> TransferModel:
    """The model this node would use: the global ``model`` with its own local tensors and, under a
    personalisation that tunes the head (FedBABU), a head fine-tuned on its data ``data``
    (batch order from ``seed``)."""
    person = personalisation(cfg)
    if not model.local_keys and not person.tunes_head:
        return model  # nothing personal: the global model is the client's
    mine = copy.deepcopy(model)
    load_local_state(mine, context)
    if person.tunes_head and len(data):
        tune = head_plan(cfg)
        tune.apply_to(mine)
        train_local(mine, data, tune, cfg.finetune, seed=seed, feed=Feed.of(cfg))
    return mine
