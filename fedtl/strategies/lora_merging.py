"""The LoRA-aware wrappers: clients at their own ranks (``LoraRanks``), the exact stacked merge folded into
the base weights (``StackedLora``), and the merge error of averaging A and B apart (``MeasuredMerge``)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.protocol import ARRAYS, METRICS
from fedtl.strategies.exchange import Exchanges
from fedtl.strategies.lora import MergeMeter, Ranks
from fedtl.strategies.roster import Roster
from fedtl.strategies.stacking import Stacking
from fedtl.strategies.wrapper import StrategyWrapper


def updates(replies: list[Message], weight_key: str) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Each reply's tensors and its weight (its metric ``weight_key``), as the LoRA merges read them."""
    return ([{k: a.numpy() for k, a in m.content[ARRAYS].items()} for m in replies],
            [float(m.content[METRICS][weight_key]) for m in replies])


class LoraRanks(StrategyWrapper):
    """Clients at other LoRA ranks (HetLoRA): each node is sent the adapters cut to the rank it declared when
    asked, and its reply is zero-padded to the server's rank before the merge.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    ranks : Ranks
        The cut and the pad of the model's adapters.
    roster : Roster
        The rank each node declared.
    """

    behaviour = "sends each node its own LoRA rank"

    def __init__(self, strategy: Strategy, *, ranks: Ranks, roster: Roster) -> None:
        super().__init__(strategy)
        self.ranks, self.roster = ranks, roster

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.ranks.cut_messages(messages, arrays, self.roster.ranks)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.ranks.cut_messages(messages, arrays, self.roster.ranks)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:  # every reply at the server's rank, zeros beyond the node's own
            msg.content[ARRAYS] = self.ranks.pad(msg.content[ARRAYS])
        return self.strategy.aggregate_train(server_round, replies)


class StackedLora(StrategyWrapper):
    """Stacked LoRA (``fedtl.strategies.stacking``): the folded base weights go down with every message, and
    the merged replies' adapters are stacked exactly and folded into them.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped; it sees the global arrays (base weights included), not only the travelling ones.
    stacking : Stacking
        The run's stacked merge.
    exchanges : Exchanges
        Where each round's merge error goes.
    weight_key : str
        The reply metric the inner strategy weights by: the stacking weights the same way.
    """

    behaviour = "stacks LoRA's adapters exactly and folds them into the base weights"

    def __init__(self, strategy: Strategy, *, stacking: Stacking, exchanges: Exchanges, weight_key: str) -> None:
        super().__init__(strategy)
        self.stacking, self.exchanges, self.weight_key = stacking, exchanges, weight_key
        self._base = ArrayRecord()  # the base weights sent in the round in progress

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._base = self.stacking.add_base(messages, arrays)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        self.stacking.add_base(messages, arrays)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            arrays, errors = self.stacking.fold(server_round, arrays, *updates(replies, self.weight_key), self._base)
            self.exchanges.of(server_round).merge_error = errors
        return arrays, metrics


class MeasuredMerge(StrategyWrapper):
    """Measure each round's LoRA merge error (averaging A and B apart against the mean of the merged clients'
    B·A) into the round's ``Exchange``.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    meter : MergeMeter
        The measure, over the layers it can measure.
    exchanges : Exchanges
        Where each round's merge error goes.
    weight_key : str
        The reply metric the inner strategy weights by.
    """

    behaviour = "measures LoRA's merge error"

    def __init__(self, strategy: Strategy, *, meter: MergeMeter, exchanges: Exchanges, weight_key: str) -> None:
        super().__init__(strategy)
        self.meter, self.exchanges, self.weight_key = meter, exchanges, weight_key

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and replies:
            self.exchanges.of(server_round).merge_error = self.meter(*updates(replies, self.weight_key))
        return arrays, metrics
