"""Server-side optimiser state across a growing set of travelling keys (gradual unfreezing).

Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) keeps its moment estimates per key
and FedAvgM its momentum as a list in key order; neither expects keys to join between
rounds. Before each round this aligns them with the round's keys: the state of keys that
travelled before is kept, keys that join start from zero (fresh), like a new parameter
added to a running optimiser. Written here because Flower has no hook for it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt


def align_server_state(strategy: Strategy, record: ArrayRecord) -> None:
    """Give ``strategy``'s optimiser state an entry for every key of ``record`` (new keys: zeros).

    Strategies without server-side state are left as they are; a wrapper (Flower's DP
    wrappers hold their strategy as ``.strategy``) is looked through.
    """
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    if isinstance(strategy, FedOpt):
        for moments in (strategy.m_t, strategy.v_t):
            if moments:  # empty until the first aggregation, when Flower initialises all keys itself
                for key in record.keys():
                    moments.setdefault(key, np.zeros_like(record[key].numpy()))
    if isinstance(strategy, FedAvgM) and strategy.current_arrays is not None:
        if strategy.momentum_vector is not None:
            by_key = dict(zip(strategy.current_arrays.keys(), strategy.momentum_vector, strict=True))
            strategy.momentum_vector = [by_key.get(k, np.zeros_like(record[k].numpy())) for k in record.keys()]
        # FedAvgM takes the global arrays once, at the start; the round's keys are these.
        strategy.current_arrays = record.copy()
