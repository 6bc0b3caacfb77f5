"""TransferStrategy: a Flower strategy wrapper that moves only what is trained.

Like Flower's DP wrappers, it holds a strategy and adds behaviour around it:
- each round's plan (units, learning rates, epochs) and the backbone fingerprint go
  into the training config;
- the ArrayRecord sent holds exactly this round's travelling keys; keys that join the
  set (gradual unfreezing) start from the server's pre-trained values;
- replies whose keys are not exactly the travelling keys are refused before merging;
- the real bytes sent and received are measured and reported to an observer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.server.plan import RoundPlan

RoundObserver = Callable[[int, dict[str, float | int]], None]


class TransferStrategy(Strategy):
    """Wrap ``inner`` so that it merges only the tensors each round trains.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples clients and aggregates.
    plan : Callable[[int], RoundPlan]
        The plan of each round (1-based).
    keys_of : Callable[[Iterable[str]], list[str]]
        State-dict keys of a set of units (``TransferModel.unit_keys``).
    initial_state : Mapping[str, torch.Tensor]
        Every unit's starting tensors (pre-trained blocks, new head): where a key that
        joins the travelling set starts.
    fingerprint : str
        Fingerprint of the pre-trained backbone; clients refuse to train on a mismatch.
    observer : RoundObserver, optional
        Called after each aggregation with the round's traffic and training figures.
    """

    def __init__(
        self, inner: Strategy, *, plan: Callable[[int], RoundPlan], keys_of: Callable[[Iterable[str]], list[str]],
        initial_state: Mapping[str, torch.Tensor], fingerprint: str, observer: RoundObserver | None = None,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.keys_of = keys_of
        self.initial = {k: v.detach().cpu().numpy() for k, v in initial_state.items()}
        self.fingerprint = fingerprint
        self.observer = observer
        self._expected: dict[int, list[str]] = {}
        self._bytes_down: dict[int, int] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> TransferStrategy: only travelling tensors are sent and merged")
        self.inner.summary()

    def travelling_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The ArrayRecord of round ``server_round``: current values, new keys from ``initial_state``."""
        keys = self.keys_of(self.plan(server_round).lrs)
        out = ArrayRecord()
        for k in keys:
            out[k] = arrays[k] if k in arrays else Array(np.ascontiguousarray(self.initial[k]))
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        plan = self.plan(server_round)
        record = self.travelling_arrays(server_round, arrays)
        cfg = ConfigRecord({**config, **plan.to_config(), "backbone-fingerprint": self.fingerprint})
        messages = list(self.inner.configure_train(server_round, record, cfg, grid))
        self._expected[server_round] = list(record.keys())
        self._bytes_down[server_round] = sum(m.content["arrays"].count_bytes() for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        expected = set(self._expected.get(server_round, []))
        accepted: list[Message] = []
        for msg in replies:
            if not msg.has_error() and set(msg.content["arrays"].keys()) != expected:
                got = set(msg.content["arrays"].keys())
                log(WARNING, "Refused update from node %s: missing keys %s, unexpected keys %s",
                    msg.metadata.src_node_id, sorted(expected - got)[:5], sorted(got - expected)[:5])
                continue
            accepted.append(msg)
        ok = [m for m in accepted if not m.has_error()]
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        if self.observer is not None:
            info: dict[str, float | int] = {
                "bytes_down": self._bytes_down.get(server_round, 0),
                "bytes_up": sum(m.content["arrays"].count_bytes() for m in ok),
                "clients_ok": len(ok),
                "clients_failed": len(replies) - len(ok),
            }
            if metrics is not None and "train-loss" in metrics:
                info["train_loss"] = float(metrics["train-loss"])
            self.observer(server_round, info)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
