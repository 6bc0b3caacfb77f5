"""``NodeSampling``: training samples only the nodes that may train, asks a node what it holds when it is first
sampled, and stops when too few are left."""

from __future__ import annotations

import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.errors import RunStoppedError
from fedtl.seeds import derived_seed
from fedtl.strategies.grids import FilteredGrid
from fedtl.strategies.roster import Roster
from fedtl.strategies.wrapper import StrategyWrapper


class NodeSampling(StrategyWrapper):
    """Sample training from the nodes not declined for good (``ReplyGate`` records who declines); a node sampled
    for the first time is asked what it holds, and one that cannot train (held out) is replaced
    (``Roster.settle``). The run stops when fewer than
    ``min_nodes`` are left (Flower would wait for them forever).

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    roster : Roster
        The run's nodes: the view training samples from, and the nodes that declined.
    min_nodes : int, default 1
        Fewest nodes a round needs (the inner strategy's minimums).
    most : int, optional
        The most nodes a round trains (the config's ``sampled_clients``), whatever the strategy sampled from
        nodes whose answers are not all known yet; default: as many as it sampled.
    seed : int, optional
        The run's seed: each round's sampling draws from Python's ``random`` seeded by it and the round.
        Flower samples with the process-wide ``random``, which other code in the process draws from too (Ray
        draws bits from it when it subscribes, as a simulation's actors start), so a seed set once at the start
        decided only the first rounds: two runs on a warm actor pool, or a resumed run, sampled other nodes
        from round 2 on. A node that cannot train is replaced with a generator of the round's own (seeded by
        the run's seed and the round), as asking nodes starts actors. Default: as the process's ``random`` stands.
    """

    behaviour = "samples only the nodes that may train"

    def __init__(self, strategy: Strategy, *, roster: Roster, min_nodes: int = 1, most: int | None = None,
                 seed: int | None = None) -> None:
        super().__init__(strategy)
        if min_nodes < 1:
            raise ValueError(f"min_nodes must be at least 1, got {min_nodes}")
        if most is not None and most < 1:
            raise ValueError(f"most must be at least 1 (or None: as sampled), got {most}")
        self.roster, self.min_nodes, self.most, self.seed = roster, min_nodes, most, seed

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
        rng = None
        if self.seed is not None:
            random.seed(derived_seed(f"sampling:{server_round}", self.seed))
            rng = random.Random(derived_seed(f"replacing:{server_round}", self.seed))
        return self.roster.settle(list(self.strategy.configure_train(server_round, arrays, config, grid)), grid,
                                  self.most, rng)
