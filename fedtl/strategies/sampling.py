"""``NodeSampling``: training samples only the nodes that may train, and stops when too few are left."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.errors import RunStoppedError
from fedtl.strategies.grids import FilteredGrid
from fedtl.strategies.replies import declined_reason
from fedtl.strategies.roster import Roster
from fedtl.strategies.wrapper import StrategyWrapper


class NodeSampling(StrategyWrapper):
    """Sample training from the nodes the ``roster`` lets train: not held out (``Roster.view``), and not
    declined for good. A node that declines (its privacy budget is spent) is counted, not merged, and never
    sampled again; the run stops when fewer than ``min_nodes`` are left (Flower would wait for them forever).

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    roster : Roster
        The run's nodes: the view training samples from, and the nodes that declined.
    min_nodes : int, default 1
        Fewest nodes a round needs (the inner strategy's minimums).
    """

    behaviour = "samples only the nodes that may train"

    def __init__(self, strategy: Strategy, *, roster: Roster, min_nodes: int = 1) -> None:
        super().__init__(strategy)
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be at least 1, got {min_nodes}")
        self.roster, self.min_nodes = roster, min_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        grid = self.roster.view(grid)
        declined = self.roster.declined
        if declined:
            grid = FilteredGrid(grid, lambda ids: [n for n in ids if n not in declined])
            left = len(list(grid.get_node_ids()))
            if left < self.min_nodes:
                raise RunStoppedError(
                    f"round {server_round}: {left} client(s) can still train, fewer than the {self.min_nodes} a round "
                    f"needs; {len(declined)} declined for good ({next(reversed(declined.values()))})")
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:
            if (reason := declined_reason(msg)) is not None:
                self.roster.decline(msg.metadata.src_node_id, reason)
                log(INFO, "Round %s: node %s declines, and is not sampled again: %s", server_round,
                    msg.metadata.src_node_id, reason)
        return self.strategy.aggregate_train(server_round, replies)
