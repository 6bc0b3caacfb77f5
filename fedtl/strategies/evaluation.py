"""``FinalEvaluation``: after the final round every node, held-out ones too, evaluates the global model on
its own test images (or, in a large population, a seeded sample of them); no other round asks the clients
to evaluate."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.protocol import (
    ACCURACY,
    ARRAYS,
    CLIENT_ACCURACY_MEAN,
    CONFIG,
    DECLINED,
    HELD_OUT,
    METRICS,
    NODE_ID,
    SERVER_ROUND,
)
from fedtl.seeds import derived_seed
from fedtl.strategies.replies import declined_reason
from fedtl.strategies.wrapper import StrategyWrapper


class EvaluationSample(NamedTuple):
    """How many nodes were asked to evaluate, of how many."""

    asked: int
    nodes: int


ClientEvaluations = Callable[[int, list[dict[str, Any]], EvaluationSample], None]
"""(round, the evaluation metrics of every node that answered, with its ``node-id``; the sample) -> None."""


class FinalEvaluation(StrategyWrapper):
    """Evaluate on every node after ``final_round``, instead of the inner strategy's sampled evaluation.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped (it still trains and merges).
    final_round : int, optional
        The round after which every node evaluates; ``None``: no client evaluation.
    on_evaluate : ClientEvaluations, optional
        Called with the round, every answering node's evaluation metrics (a node whose gate declined: with
        why) and how many were asked of how many.
    sample : int, default 0
        Ask at most this many nodes, drawn from ``seed`` (in the grid's order, so a seed picks the same
        partitions in simulation); 0: every node.
    seed : int, default 0
        The run's seed.
    """

    behaviour = "every node evaluates after the final round"

    def __init__(self, strategy: Strategy, *, final_round: int | None = None,
                 on_evaluate: ClientEvaluations | None = None, sample: int = 0, seed: int = 0) -> None:
        super().__init__(strategy)
        if final_round is not None and final_round < 1:
            raise ValueError(f"final_round must be a round (1 or more) or None, got {final_round}")
        if sample < 0:
            raise ValueError(f"sample must be 0 (every node) or a number of nodes, got {sample}")
        self.final_round, self.on_evaluate, self.sample, self.seed = final_round, on_evaluate, sample, seed
        self.asked = EvaluationSample(0, 0)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round != self.final_round:
            return []
        nodes = list(grid.get_node_ids())
        chosen = nodes
        if self.sample and len(nodes) > self.sample:
            chosen = random.Random(derived_seed("final-evaluation", self.seed)).sample(nodes, self.sample)
        self.asked = EvaluationSample(len(chosen), len(nodes))
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**config, SERVER_ROUND: server_round})})
        return [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in chosen]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        clients = [{NODE_ID: m.metadata.src_node_id, **dict(m.content[METRICS]),
                    **({DECLINED: why} if (why := declined_reason(m)) is not None else {})}  # its gate said no
                   for m in replies if not m.has_error() and METRICS in m.content.metric_records]
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, clients, self.asked)
        scored = [c[ACCURACY] for c in clients if ACCURACY in c and not c.get(HELD_OUT)]
        return MetricRecord({CLIENT_ACCURACY_MEAN: float(np.mean(scored))}) if scored else None
