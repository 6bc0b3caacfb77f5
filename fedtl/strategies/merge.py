"""What happens to a merged ArrayRecord before it becomes the global model: normalisation statistics by the
weighted mean (``StatisticsByMean``), and every array in the dtype it was sent in."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedtl.models.transfer import STATISTICS
from fedtl.protocol import ARRAYS, METRICS
from fedtl.strategies.replies import Spec
from fedtl.strategies.wrapper import StrategyWrapper


def as_sent(arrays: ArrayRecord, spec: Spec) -> ArrayRecord:
    """``arrays`` in the dtypes they were sent in: server optimisers (FedAdam's float64
    arithmetic) must not change what clients load into their float32 models."""
    return ArrayRecord({k: a if a.dtype == spec[k][1] else Array(a.numpy().astype(np.dtype(spec[k][1])))
                        for k, a in arrays.items()})


def mean_statistics(arrays: ArrayRecord, replies: list[Message], weight_key: str) -> ArrayRecord:
    """``arrays`` with every normalisation statistic replaced by the replies' ``weight_key``-weighted mean."""
    keys = [k for k in arrays.keys() if k.endswith(STATISTICS)]
    if not keys:
        return arrays
    w = np.array([float(m.content[METRICS][weight_key]) for m in replies])
    out = ArrayRecord({k: a for k, a in arrays.items()})
    for k in keys:
        stack = np.stack([m.content[ARRAYS][k].numpy() for m in replies])
        out[k] = Array(np.tensordot(w / w.sum(), stack, axes=1).astype(stack.dtype))
    return out


class StatisticsByMean(StrategyWrapper):
    """Average normalisation statistics (running mean and variance), never optimise them: a server optimiser's
    step (FedAdam) on a variance could make it negative.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped (one that steps a server optimiser).
    weight_key : str
        The reply metric the mean weights by (e.g. ``"num-examples"``).
    """

    behaviour = "averages normalisation statistics"

    def __init__(self, strategy: Strategy, *, weight_key: str) -> None:
        super().__init__(strategy)
        if not weight_key:
            raise ValueError("weight_key must name the reply metric to weight by")
        self.weight_key = weight_key

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return (None if arrays is None else mean_statistics(arrays, replies, self.weight_key)), metrics
