"""Server-side optimiser state across a growing set of travelling keys (gradual unfreezing).

Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) keeps its moment estimates per key
and FedAvgM its momentum as a list in key order; neither expects keys to join between
rounds. Before each round this aligns them with the round's keys: the state of keys that
travelled before is kept, keys that join start from zero (fresh), like a new parameter
added to a running optimiser. Written here because Flower has no hook for it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord
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


# -- the state a resumed run needs ----------------------------------------------------------------
# What Flower's strategies and DP wrappers carry from round to round (1.42), by attribute: FedOpt's
# moments, FedAvgM's momentum and the arrays it is kept against, an adaptive clipping norm, a DP
# wrapper's accountant. Everything else is rebuilt from the config, or set again by configure_train
# (``current_arrays`` of FedOpt, q-FedAvg and the DP wrappers). Flower has no state API for its
# strategies, hence this table; a strategy holding other state would need its attribute added here.
_CARRIED = ("m_t", "v_t", "momentum_vector", "clipping_norm", "accountant")


def _chain(strategy: Strategy) -> list[Strategy]:
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The carried state of ``strategy`` and what it wraps: arrays (by ``<depth>/<attribute>/<key>``) and
    JSON-able values (by ``<depth>/<attribute>``), for ``load_strategy_state``."""
    arrays: dict[str, np.ndarray] = {}
    values: dict[str, object] = {}
    for depth, s in enumerate(_chain(strategy)):
        if isinstance(s, FedAvgM) and s.momentum_vector is not None and s.current_arrays is not None:
            arrays.update({f"{depth}/current_arrays/{k}": a.numpy() for k, a in s.current_arrays.items()})
        for attr in _CARRIED:
            value = getattr(s, attr, None)
            name = f"{depth}/{attr}"
            if value is None:
                continue
            if isinstance(value, dict):
                arrays.update({f"{name}/{k}": np.asarray(v) for k, v in value.items()})
                values[name] = "dict"
            elif isinstance(value, list):
                arrays.update({f"{name}/{i}": np.asarray(v) for i, v in enumerate(value)})
                values[name] = "list"
            elif hasattr(value, "state_dict"):
                values[name] = {"state_dict": value.state_dict()}
            else:
                values[name] = float(value)
    return arrays, values


def load_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray], values: dict[str, object]) -> None:
    """Put back into ``strategy`` (built afresh from the same config) what ``strategy_state`` took from it."""
    for depth, s in enumerate(_chain(strategy)):
        prefix = f"{depth}/current_arrays/"
        current = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
        if current:
            s.current_arrays = ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in current.items()})
        for attr in _CARRIED:
            name = f"{depth}/{attr}"
            if name not in values:
                continue
            kind = values[name]
            items = {k[len(name) + 1:]: a for k, a in arrays.items() if k.startswith(name + "/")}
            if kind == "dict":
                setattr(s, attr, dict(items))
            elif kind == "list":
                setattr(s, attr, [items[str(i)] for i in range(len(items))])
            elif isinstance(kind, dict):
                getattr(s, attr).load_state_dict(kind["state_dict"])
            else:
                setattr(s, attr, kind)
