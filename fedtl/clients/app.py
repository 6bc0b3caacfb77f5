"""The ClientApp: one per SuperNode (simulated or real).

Each training message carries the round's plan and the travelling tensors; the
client rebuilds the same model from its local pre-trained weights, checks their
fingerprint against the server's, trains its own data (``clients.node_data``: its
``data-path`` when deployed, its partition when simulated) on its device, and replies
only the travelling tensors.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedtl.clients.gate import declined, gate_mod
from fedtl.clients.node_data import NodeData, node_data
from fedtl.clients.personal import head_phase, load_local_state, local_round, personalised_model, save_local_state
from fedtl.clients.privacy import RoundInputs, client_privacy
from fedtl.clients.ranks import at_node_rank
from fedtl.clients.trainer import train_local
from fedtl.config import ExperimentConfig
from fedtl.devices import resolve_device
from fedtl.errors import BackboneMismatchError, BudgetSpentError
from fedtl.models.features import Feed
from fedtl.models.metrics import evaluate_model
from fedtl.models.ncm import class_sums, head_inputs
from fedtl.models.transfer import TransferModel
from fedtl.personalisation import personalisation, run_model
from fedtl.privacy import privacy_mode
from fedtl.protocol import (
    ACCURACY,
    ACCURACY_BEFORE,
    ACCURACY_PERSONAL,
    ARRAYS,
    BASE,
    CLASS_SUMS,
    CONFIG,
    COUNTS,
    DEVICE,
    FINGERPRINT,
    HEAD_START,
    HELD_OUT,
    LORA_RANK,
    METRICS,
    NORM_SUM,
    NUM_EXAMPLES,
    SERVER_ROUND,
    STEPS,
    SUMS,
    THREADS,
    TRAIN_LOSS,
    UNIT_WEIGHT,
    RoundPlan,
)
from fedtl.seeds import derived_seed
from fedtl.wire import torch_state


@lru_cache(maxsize=4)  # a HetLoRA run's process serves a config per rank (2, 4, 8): each rebuilt 0.12 s on Lite0
def base_model(cfg: ExperimentConfig) -> TransferModel:
    """The run's model as every round starts it, built (weights read, fingerprinted) once per process."""
    return run_model(cfg)


def node_device(context: Context, cfg: ExperimentConfig) -> torch.device:
    """Where this node computes: its node config's ``device`` if set, else the run's ``device``."""
    return resolve_device(str(context.node_config.get(DEVICE, cfg.device)))


def checked_model(config: ConfigRecord, cfg: ExperimentConfig, written: Collection[str] | None = None) -> TransferModel:
    """A copy of the run's model as every round starts it, once its fingerprint matches the server's (``config``).

    ``written``: where given, the state-dict keys this message may change (what it trains or loads); every other
    parameter is the run's model's own, shared rather than copied. Copying a frozen backbone is most of what a
    small round costs (``mobilenet_v3_small``: 32 ms a message, for a head that trains in 5); a parameter that
    neither trains (it does not require a gradient) nor is loaded is never written. Buffers are always copied.

    Raises
    ------
    BackboneMismatchError
        If this node's pre-trained weights are not the server's.
    """
    base = base_model(cfg)
    memo: dict[int, Any] = {}
    if written is not None:
        memo = {id(p): p for k, p in base.named_parameters() if k not in written}
    model = copy.deepcopy(base, memo)
    theirs = config.get(FINGERPRINT)
    if theirs != model.backbone_fingerprint:
        raise BackboneMismatchError(
            f"backbone fingerprint mismatch: server {theirs}, this node {model.backbone_fingerprint}. "
            "Both must load the same pre-trained weights (same backbone, pretrain settings and weights file)."
        )
    return model


def received_model(msg: Message, cfg: ExperimentConfig, device: torch.device | str = "cpu",
                   share_frozen: bool = False) -> tuple[TransferModel, RoundPlan]:
    """The run's model with the message's travelling tensors loaded, on ``device``, and the message's plan.

    Local tensors (personalisation) keep the run's initial values: this is the global model.
    ``share_frozen`` (training, on a CPU): the parameters the plan neither trains nor loads, nor the node keeps
    (its local tensors), are the run's model's own (``checked_model``); only for a caller that changes nothing
    beyond the plan's units (evaluation's local tuning may train others: it gets a copy of everything). On
    another device ``Module.to`` would move the run's model's own parameters: everything is copied.

    Raises
    ------
    BackboneMismatchError
        If this node's pre-trained weights are not the server's.
    """
    config = msg.content[CONFIG]
    plan = RoundPlan.from_config(config)
    written = None
    if share_frozen and torch.device(device).type == "cpu":
        base = base_model(cfg)
        loaded = msg.content[BASE].keys() if BASE in msg.content.array_records else ()
        written = {*base.trained_keys(plan.lrs), *base.local_keys, *loaded}
    model = checked_model(config, cfg, written)
    plan.apply_to(model)
    if BASE in msg.content.array_records:  # stacked LoRA: the base weights the server folded the rounds into
        model.load_some(torch_state(msg.content[BASE]))
    model.load_travelling_state(torch_state(msg.content[ARRAYS]))
    return model.to(device), plan


def handle_evaluate(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """The received model's accuracy on this node's own test images, global and personalised.

    ``accuracy`` is the global model's; ``accuracy-personal`` the model this node would use
    (``personalised_model``: its own local tensors, FedBABU's tuned head; the global model
    when nothing is personal). A held-out node (never trained on) instead fine-tunes the
    model locally, once, as a training round's plan says, and reports its accuracy before
    (``accuracy-before``) and after (``accuracy``). Only these metrics leave the node;
    under DP they are not covered by the guarantee (nor are Flower's evaluation metrics).
    """
    node = node_data(context, cfg)
    model, plan = received_model(msg, cfg, node_device(context, cfg))
    test = node.test()
    feed = Feed.of(cfg)
    metrics: dict[str, float | int] = {**node.metrics, HELD_OUT: int(node.held_out), NUM_EXAMPLES: len(test)}
    if len(test):
        before = evaluate_model(model, test, feed)
        if node.held_out:
            data = node.train()
            train_local(model, data, plan, cfg.finetune, seed=derived_seed(f"adapt:{node.key}", cfg.seed), feed=feed)
            if personalisation(cfg).tunes_head:  # FedBABU: the head was never trained; tune it as the others do
                model = personalised_model(model, context, cfg, data,
                                           seed=derived_seed(f"tune-head:{node.key}", cfg.seed))
            metrics[ACCURACY_BEFORE] = before[ACCURACY]
            metrics.update(evaluate_model(model, test, feed))
        else:
            mine = personalised_model(model, context, cfg, node.train(),
                                      seed=derived_seed(f"tune-head:{node.key}", cfg.seed))
            metrics.update(before)
            metrics[ACCURACY_PERSONAL] = before[ACCURACY] if mine is model else evaluate_model(mine, test, feed)[ACCURACY]
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)


def handle_query(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """This node's partition (if it has one), whether it is held out of training and, if not, how many
    training examples it holds (the server asks once per node)."""
    node = node_data(context, cfg)
    declared = {} if node.held_out else {NUM_EXAMPLES: len(node.train())}  # the most a training reply may count
    # Its LoRA rank too: the server cuts the adapters it sends to it (HetLoRA).
    metrics = MetricRecord({**node.metrics, HELD_OUT: int(node.held_out), **declared, LORA_RANK: cfg.finetune.lora_rank})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def held_out_reply(msg: Message, node: NodeData) -> Message:
    """A held-out node's answer to a training message or a head start: it declines, saying why."""
    return declined(msg, f"node {node.key} is held out of training (data.held-out-clients or its node config's "
                         "held-out)", node.metrics)


def handle_head_start(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """FedNCM's round 0 (``finetune.head-init = "ncm"``): this node's class sums of the features the head
    receives from the frozen pre-trained backbone (``fedtl.models.ncm.class_sums``), through the feature
    cache; no tensor is received. A held-out node declines.

    Raises
    ------
    BackboneMismatchError
        If this node's pre-trained weights are not the server's.
    """
    node = node_data(context, cfg)
    if node.held_out:
        return held_out_reply(msg, node)
    model = checked_model(msg.content[CONFIG], cfg).to(node_device(context, cfg))
    data = node.train()
    sums, counts, norm_sum = class_sums(head_inputs(model, data, Feed.of(cfg)), data.y, model.head.out_features)
    arrays = ArrayRecord({SUMS: Array(sums.numpy()), COUNTS: Array(counts.numpy()), NORM_SUM: Array(norm_sum.numpy())})
    metrics = MetricRecord({NUM_EXAMPLES: len(data), **node.metrics})
    return Message(RecordDict({CLASS_SUMS: arrays, METRICS: metrics}), reply_to=msg)


def handle_train(msg: Message, context: Context, cfg: ExperimentConfig) -> Message:
    """Train this node's partition as the message's plan says; reply the travelling tensors.

    Parameters
    ----------
    msg : Message
        A training message from fedtl's ServerApp: ``"arrays"`` (the travelling tensors)
        and ``"config"`` (the round's plan, server round and backbone fingerprint).
    context : Context
        The node's context; ``node_config`` names its data (``data-path``) or its partition.
    cfg : ExperimentConfig
        The run's config.

    Returns
    -------
    Message
        The travelling tensors and metrics; or, from a client that declines (its privacy
        budget is spent), metrics and a ``"declined"`` ConfigRecord with the reason.

    Raises
    ------
    BackboneMismatchError
        If this node's pre-trained weights are not the server's.
    DataError
        If the node's data cannot be read (the message names the node and the path).
    ValueError
        If the node's partition does not fit the run's config, or the plan is malformed.
    """
    node = node_data(context, cfg)
    if node.held_out:
        return held_out_reply(msg, node)
    data = node.train()
    model, plan = received_model(msg, cfg, node_device(context, cfg), share_frozen=True)
    load_local_state(model, context)  # this node's own head / norms from its earlier rounds
    seed = derived_seed(f"train:{int(msg.content[CONFIG][SERVER_ROUND])}:{node.key}", cfg.seed)
    try:
        result, extra = local_round(client_privacy(cfg).local_round, model, data, plan, RoundInputs.of(cfg, context),
                                    seed, head=head_phase(cfg))
    except BudgetSpentError as spent:
        # Not a failure: the client declines, says why, and the round goes on without it.
        return declined(msg, str(spent), {**spent.metrics, **node.metrics})

    save_local_state(model, context, list(plan.lrs))  # never in the reply: it holds only travelling keys
    loss = {TRAIN_LOSS: result.loss} if privacy_mode(cfg).reply_loss else {}  # un-noised: not under DP-SGD
    metrics = MetricRecord({
        **loss, NUM_EXAMPLES: result.examples, UNIT_WEIGHT: 1, STEPS: result.steps, **node.metrics, **extra,
    })
    content = RecordDict({ARRAYS: ArrayRecord(model.travelling_state()), METRICS: metrics})
    return Message(content=content, reply_to=msg)


@lru_cache(maxsize=4)
def parsed_config(run_config: tuple[tuple[str, Any], ...]) -> ExperimentConfig:
    """The run's config, parsed and validated once per process (not once per message)."""
    return ExperimentConfig.from_run_config(dict(run_config))


def set_threads(context: Context, cfg: ExperimentConfig) -> None:
    """Torch's CPU threads for this node: its node config's ``threads`` if set; under Ray (simulation),
    ``simulation.threads`` (resolved before the run from the CPUs Ray reserves for each client,
    ``simulation.num-cpus``), so clients do not oversubscribe the cores; else (a deployed SuperNode)
    torch's default, every core."""
    ray = sys.modules.get("ray")
    if THREADS in context.node_config:
        torch.set_num_threads(max(1, int(context.node_config[THREADS])))
    elif ray is not None and ray.is_initialized():
        torch.set_num_threads(max(1, cfg.simulation.threads or round(cfg.simulation.num_cpus)))


def make_client_app(run_config: Mapping[str, Any] | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp for ``run_config`` (a flattened ExperimentConfig).

    ``None`` reads it from the run's Context, as under ``flwr run``; ``fedtl simulate``
    passes it here because Flower's ``run_simulation`` carries no run config. ``mods``: Flower
    mods around everything the node does, its privacy mode's included (what a node sends is
    what they return: the fault-injection tests corrupt replies this way). Outermost, before them,
    the node's privacy gate (``fedtl.clients.gate``): a message its owner's policy does not allow
    reaches no handler.
    """
    def config_of(context: Context) -> ExperimentConfig:
        cfg = parsed_config(tuple(sorted((run_config if run_config is not None else context.run_config).items())))
        return at_node_rank(cfg, context.node_config)  # HetLoRA: the node's own rank

    def privacy_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        # The mode's own Flower mod (client-side clipping for client-level DP), chosen per run.
        # Flower's clipping mods act on training replies only (they would refuse other messages).
        cfg = config_of(context)
        mod = client_privacy(cfg).client_mod(cfg)
        if mod is None or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        return mod(msg, context, call_next)

    client = ClientApp(mods=[gate_mod(config_of), *mods, privacy_mod])

    def handler(handle: Callable[[Message, Context, ExperimentConfig], Message]) -> Callable[[Message, Context], Message]:
        def run(msg: Message, context: Context) -> Message:
            cfg = config_of(context)
            set_threads(context, cfg)
            return handle(msg, context, cfg)
        return run

    client.train()(handler(handle_train))
    client.evaluate()(handler(handle_evaluate))
    client.query()(handler(handle_query))
    client.query(HEAD_START.split(".", 1)[1])(handler(handle_head_start))  # a query with its own action

    return client


app = make_client_app()
