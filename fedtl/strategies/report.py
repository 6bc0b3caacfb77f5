"""What a round's training exchanged, reported to the run's records: ``RoundReporting`` measures the bytes
and hands each round's ``RoundReport`` to an observer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.errors import RoundFailedError
from fedtl.protocol import ARRAYS, DECLINED, METRICS, NODE_ID, NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS
from fedtl.run_folder import BYTES_DOWN, BYTES_UP, CLIENTS_DECLINED, CLIENTS_FAILED, CLIENTS_OK, ROUND_TRAIN_LOSS
from fedtl.strategies.exchange import Exchanges
from fedtl.strategies.replies import declined_reason
from fedtl.strategies.roster import Roster
from fedtl.strategies.wrapper import StrategyWrapper


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
        BYTES_DOWN: bytes_down,
        BYTES_UP: bytes_up(replies) if received is None else received,
        CLIENTS_OK: len(accepted),
        CLIENTS_FAILED: sent - len(accepted) - declined,  # error replies, refused updates and timeouts
        CLIENTS_DECLINED: declined,
    }
    if metrics is not None and TRAIN_LOSS in metrics:
        totals[ROUND_TRAIN_LOSS] = float(metrics[TRAIN_LOSS])
    clients = [{NODE_ID: m.metadata.src_node_id, DECLINED: declined_reason(m) is not None,
                **dict(m.content.metric_records[METRICS])}
               for m in replies if not m.has_error() and METRICS in m.content.metric_records]
    return RoundReport(server_round, totals, clients, problems, unanswered or [], merge_error or {})


class RoundReporting(StrategyWrapper):
    """Report every round's training exchange to ``observer``, a failed round's too (what its nodes spent is
    recorded before the run ends). The bytes down are counted as the messages leave, the bytes up as the
    replies arrive (before any wrapper pads them); the rest is what the other wrappers recorded in the round's
    ``Exchange``.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    observer : RoundObserver
        Called with each round's ``RoundReport``.
    exchanges : Exchanges
        The run's round records (this wrapper takes each out once reported).
    roster : Roster
        What the nodes declared: how the report names a node that never answered.
    """

    behaviour = "reports what each round exchanged"

    def __init__(self, strategy: Strategy, *, observer: RoundObserver, exchanges: Exchanges, roster: Roster) -> None:
        super().__init__(strategy)
        if not callable(observer):
            raise TypeError(f"observer must be callable, got {observer!r}")
        self.observer, self.exchanges, self.roster = observer, exchanges, roster

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.exchanges.of(server_round).bytes_down = sum(
            r.count_bytes() for m in messages for r in m.content.array_records.values())
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        received = bytes_up(replies)  # as they came, before any padding
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        except RoundFailedError:
            self._report(server_round, replies, None, received)
            raise
        self._report(server_round, replies, metrics, received)
        return arrays, metrics

    def _report(self, server_round: int, replies: list[Message], metrics: MetricRecord | None,
                received: int) -> None:
        x = self.exchanges.pop(server_round)
        unanswered = None if x.all_declined else self._unanswered(list(x.sent), replies)
        self.observer(round_report(server_round, replies, x.merged, x.declined, len(x.sent), x.bytes_down, metrics,
                                   x.problems, unanswered, received, x.merge_error))

    def _unanswered(self, sent_to: list[int], replies: list[Message]) -> list[dict[str, int]]:
        """``RoundReport.unanswered``: the nodes of ``sent_to`` with no reply in ``replies`` but an error."""
        answered = {m.metadata.src_node_id for m in replies if not m.has_error()}
        declared, partitions = self.roster.examples, self.roster.partitions
        return [{NODE_ID: n, **({PARTITION_ID: partitions[n]} if n in partitions else {}),
                 **({NUM_EXAMPLES: declared[n]} if n in declared else {})}
                for n in sorted(set(sent_to) - answered)]
