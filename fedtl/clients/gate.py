"""The node's privacy gate: every message a node answers passes here first, before its data is touched.

A node's owner sets its policy in its node config (``flower-supernode --node-config``), which the
server cannot change: ``answers`` (what it answers at all) and ``max-epsilon`` with ``state-dir`` (its
lifetime cap on DP-SGD spend). The gate names the release a message asks for (``RELEASES``: one entry
per kind, with what it reads and reveals) and declines, with the reason, what the policy or the run's
privacy mode does not allow. The server records a decline as it records a budget's.

A DP-SGD round the gate lets through still checks the node's cap and records its spend, under the
``state-dir`` lock, before it trains (``fedtl.clients.spend.reserve_round``): only the round knows its steps.

A message type without an entry is declined: a statistics query added later answers nothing until it
says what it releases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedtl.clients.node_data import node_data
from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.personalisation import personalisation
from fedtl.privacy import privacy_mode
from fedtl.protocol import DECLINED, HEAD_START, METRICS, NODE_ANSWERS, NODE_MAX_EPSILON, REASON
from fedtl.registry import Registry

FLOORS = ("dp-sgd", "accounted", "all")
"""What a node answers (node config ``answers``), strictest first: ``dp-sgd``, DP-SGD training and the count
query only; ``accounted``, also the evaluation of a received model on its test split (no training); ``all``,
whatever the run asks. A node with ``max-epsilon`` answers at most ``accounted``."""


@dataclass(frozen=True)
class Release:
    """One kind of answer a node gives, as its owner and ``docs/privacy.md`` see it.

    Attributes
    ----------
    reads : str
        The node's data it reads.
    reveals : str
        What leaves the node.
    floor : str
        The strictest ``FLOORS`` entry that still answers it.
    under_dp : bool
        Whether a run under an accounted privacy mode may ask it at all (class sums would be un-noised).
    """

    reads: str
    reveals: str
    floor: str = "all"
    under_dp: bool = True


RELEASES: Registry[Release] = Registry("release")
RELEASES.register("count")(Release(
    "the size of its training split", "its example count, whether it is held out, its partition id and LoRA rank; "
    "public under every mode (DP-SGD's guarantee is stated for data sets of that size)", floor="dp-sgd"))
RELEASES.register("dp-sgd-training")(Release(
    "its training split", "the travelling tensors after DP-SGD (clipped per-sample gradients, Gaussian noise), "
    "its accountant's figures, its example count; counted by its accountant and by the node's cap",
    floor="dp-sgd"))
RELEASES.register("training")(Release(
    "its training split", "the travelling tensors as trained and the training loss, without noise (client-level "
    "DP noises the merged update on the server, which sees each clipped update)"))
RELEASES.register("evaluation")(Release(
    "its test split", "accuracy, loss and ECE of the received model (and of its own local tensors): un-noised, "
    "outside every guarantee", floor="accounted"))
RELEASES.register("evaluation-training")(Release(
    "its training split, then its test split", "the accuracy of a model it first trains on its training split "
    "without DP (a held-out node adapting the final model; FedBABU tuning its head): outside every guarantee"))
RELEASES.register("head-start")(Release(
    "its training split", "per-class sums of its features, their norms and its per-class counts (FedNCM's head "
    "start), exact", under_dp=False))


def _train(msg: Message, context: Context, cfg: ExperimentConfig) -> str:
    return "dp-sgd-training" if privacy_mode(cfg).per_sample else "training"


def _evaluate(msg: Message, context: Context, cfg: ExperimentConfig) -> str:
    trains = node_data(context, cfg).held_out or personalisation(cfg).tunes_head
    return "evaluation-training" if trains else "evaluation"


# Message type -> the release answering it would be (as the handler the ClientApp runs for it would answer).
KINDS: dict[str, Callable[[Message, Context, ExperimentConfig], str]] = {
    MessageType.TRAIN: _train,
    MessageType.EVALUATE: _evaluate,
    MessageType.QUERY: lambda msg, context, cfg: "count",
    HEAD_START: lambda msg, context, cfg: "head-start",
}


def node_floor(context: Context) -> str:
    """What this node answers: its node config's ``answers`` (default ``all``), at most ``accounted`` with a cap.

    Raises
    ------
    ConfigError
        If ``answers`` is none of ``FLOORS``.
    """
    floor = str(context.node_config.get(NODE_ANSWERS, "all"))
    if floor not in FLOORS:
        raise ConfigError(f"this node's --node-config {NODE_ANSWERS}='{floor}' is none of {', '.join(FLOORS)}: "
                          f"e.g. --node-config \"{NODE_ANSWERS}='accounted'\"")
    if NODE_MAX_EPSILON in context.node_config and FLOORS.index(floor) > FLOORS.index("accounted"):
        return "accounted"  # a cap on DP-SGD spend means nothing if un-accounted releases pass
    return floor


def refusal(msg: Message, context: Context, cfg: ExperimentConfig) -> str | None:
    """Why this node declines ``msg``, or ``None`` if its policy and the run's privacy mode let it answer."""
    kind = KINDS.get(msg.metadata.message_type)
    if kind is None:
        return (f"this node answers no {msg.metadata.message_type!r} message: no release of that kind is declared "
                "(fedtl.clients.gate.RELEASES)")
    name = kind(msg, context, cfg)
    release, floor = RELEASES.get(name), node_floor(context)
    if not release.under_dp and privacy_mode(cfg).accounted:
        return (f"this node declines a {name} release under privacy.mode = \"{cfg.privacy.mode}\": it would send "
                f"{release.reveals.split(' (')[0]}, outside the run's guarantee")
    if FLOORS.index(floor) < FLOORS.index(release.floor):
        capped = f" (its {NODE_MAX_EPSILON} cap allows at most 'accounted')" if NODE_MAX_EPSILON in context.node_config \
            else ""
        return (f"this node answers only '{floor}' releases{capped}; a {name} release would read {release.reads} "
                f"and send {release.reveals.split(' (')[0]}, outside its DP-SGD accountant")
    return None


def declined(msg: Message, reason: str, metrics: dict[str, int] | None = None) -> Message:
    """A reply that declines ``msg``, saying why (with ``metrics`` that identify the node)."""
    return Message(RecordDict({METRICS: MetricRecord(metrics or {}), DECLINED: ConfigRecord({REASON: reason})}),
                   reply_to=msg)


def gate_mod(config_of: Callable[[Context], ExperimentConfig]) -> Callable[[Message, Context, ClientAppCallable],
                                                                          Message]:
    """The gate as a Flower mod, outermost on the ClientApp (``config_of``: the run's config from a context)."""
    def gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        cfg = config_of(context)
        why = refusal(msg, context, cfg)
        if why is None:
            return call_next(msg, context)
        return declined(msg, why, node_data(context, cfg).metrics)
    return gate
