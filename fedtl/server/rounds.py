"""The round loop: train, merge, evaluate on the clients and centrally, checkpoint; from any first round.

Flower 1.42's ``Strategy.start`` always starts at round 1 and has no hook after a round; a resumed run
starts later and writes its checkpoint after each round, so the loop is fedtl's own, calling the
strategy's four methods as Flower's does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

RoundHook = Callable[[int, ArrayRecord], None]
"""(round, the global arrays after it) -> None."""


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, *, rounds: range, timeout: float,
               evaluate: RoundHook, after_round: RoundHook) -> ArrayRecord:
    """Run ``rounds`` of ``strategy`` on ``grid`` from the global ``arrays``; return the global arrays after them.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy.
    grid : Grid
        Flower's grid of the run's nodes.
    arrays : ArrayRecord
        The global arrays before ``rounds.start`` (a resumed run: after its last round, evaluated then).
    rounds : range
        The rounds to run, e.g. ``range(1, 21)``; from round 1, ``arrays`` are evaluated first, as round 0.
    timeout : float
        Seconds each exchange waits for replies.
    evaluate : RoundHook
        The central evaluation after each round (and of round 0).
    after_round : RoundHook
        Called once each round has ended (the resume checkpoint).
    """
    log(INFO, "Starting %s strategy from round %s of %s:", type(strategy).__name__, rounds.start, rounds.stop - 1)
    strategy.summary()
    if rounds.start == 1:
        evaluate(0, arrays)
    for rnd in rounds:
        log(INFO, "[ROUND %s/%s]", rnd, rounds.stop - 1)
        replies = grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid), timeout=timeout)
        merged, _ = strategy.aggregate_train(rnd, replies)
        if merged is not None:
            arrays = merged
        evaluated = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                          timeout=timeout)
        strategy.aggregate_evaluate(rnd, evaluated)
        evaluate(rnd, arrays)
        after_round(rnd, arrays)
    return arrays


IN_MEMORY_PULL_S = 0.01


def pull_sooner(grid: Grid) -> None:
    """A simulation's grid (Flower's ``InMemoryGrid``) looks for replies every 10 ms, not every 100 ms.

    Its replies are in this process's memory and a look is a dict lookup, while each ``send_and_receive``
    waited half of Flower's 100 ms on average after its last reply came: at 50 clients a round, 1 ms of every
    trained client's time. Any other grid is left as it is."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = min(grid.pull_interval, IN_MEMORY_PULL_S)


def wait_for_nodes(grid: Grid, count: int, poll_s: float = 0.1) -> None:
    """Return once ``grid`` has at least ``count`` nodes connected (0: at once)."""
    logged = False
    while count and len(list(grid.get_node_ids())) < count:
        if not logged:
            log(INFO, "Waiting for the %s nodes of the population to connect", count)
            logged = True
        time.sleep(poll_s)
