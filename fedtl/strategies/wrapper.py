"""The base of fedtl's strategy wrappers: hold a Flower strategy, add one behaviour, delegate the rest.

Flower's own wrappers (``DifferentialPrivacyFixedClippingBase``) hold their strategy as ``.strategy``;
so do these, which lets code that looks through wrappers (``fedtl.strategies.state``) find the
strategy that keeps the optimiser state, whichever wrappers surround it.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """A strategy that passes every call to ``strategy``; a subclass overrides the calls its behaviour changes.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped: Flower's, or another wrapper.
    """

    #: One line for Flower's strategy summary: what this wrapper adds.
    behaviour = "passes every call on"

    def __init__(self, strategy: Strategy) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"{type(self).__name__} wraps a Flower Strategy, got {type(strategy).__name__}")
        self.strategy = strategy

    def summary(self) -> None:
        log(INFO, "\t├──> %s: %s", type(self).__name__, self.behaviour)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
