"""What a round's training exchanged, as ``TransferStrategy`` reports it to the run's records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, MetricRecord

from fedtl.protocol import ARRAYS, DECLINED, METRICS, NODE_ID, TRAIN_LOSS
from fedtl.strategies.replies import declined_reason


@dataclass
class RoundReport:
    """What a round's training exchanged, for the run's records.

    Attributes
    ----------
    round : int
        The server round.
    totals : dict
        ``bytes_down``, ``bytes_up``, ``clients_ok`` (merged), ``clients_failed`` (error
        replies, refused updates, timeouts), ``clients_declined`` and ``train_loss``.
    clients : list of dict
        The metrics of every reply that carried any, with its ``node-id``.
    problems : list of str
        Why each failed node's update was not merged: its error reply, a refused update, no reply.
    unanswered : list of dict
        Every node sent the round's training whose reply never came or was an error (it may have trained
        all the same): its ``node-id``, and its ``partition-id`` and declared ``num-examples`` where known.
    merge_error : dict
        With LoRA, per adapted layer: how far averaging A and B apart lands from the mean of the merged
        clients' updates B·A (``fedtl.strategies.lora.merge_error``); empty when not measured.
    """

    round: int
    totals: dict[str, float | int]
    clients: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unanswered: list[dict[str, int]] = field(default_factory=list)
    merge_error: dict[str, float] = field(default_factory=dict)


RoundObserver = Callable[[RoundReport], None]


def bytes_up(replies: list[Message]) -> int:
    """The bytes of the arrays ``replies`` hold."""
    return sum(m.content[ARRAYS].count_bytes() for m in replies if not m.has_error() and ARRAYS in m.content.array_records)


def round_report(server_round: int, replies: list[Message], accepted: list[Message], declined: int, sent: int,
                 bytes_down: int, metrics: MetricRecord | None, problems: list[str],
                 unanswered: list[dict[str, int]] | None = None, received: int | None = None,
                 merge_error: dict[str, float] | None = None) -> RoundReport:
    """The round's report: ``sent`` nodes were sent ``bytes_down`` bytes; ``replies`` came back (``received``
    bytes, default: what their arrays hold now), of which ``accepted`` were merged and ``declined`` declined;
    ``metrics`` is the inner strategy's aggregate, ``merge_error`` LoRA's (``RoundReport.merge_error``)."""
    totals: dict[str, float | int] = {
        "bytes_down": bytes_down,
        "bytes_up": bytes_up(replies) if received is None else received,
        "clients_ok": len(accepted),
        "clients_failed": sent - len(accepted) - declined,  # error replies, refused updates and timeouts
        "clients_declined": declined,
    }
    if metrics is not None and TRAIN_LOSS in metrics:
        totals["train_loss"] = float(metrics[TRAIN_LOSS])
    clients = [{NODE_ID: m.metadata.src_node_id, DECLINED: declined_reason(m) is not None,
                **dict(m.content.metric_records[METRICS])}
               for m in replies if not m.has_error() and METRICS in m.content.metric_records]
    return RoundReport(server_round, totals, clients, problems, unanswered or [], merge_error or {})
