"""``TravellingKeys``: only what a round trains travels, with the round's plan and the backbone's fingerprint.

The ArrayRecord sent holds exactly the round's travelling keys; keys that join the set (gradual
unfreezing) start from the server's pre-trained values, and the inner strategy's optimiser state gets
an entry for them (``fedtl.strategies.state.align_server_state``). What comes back is merged in the
dtypes it was sent in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedtl.protocol import FINGERPRINT, RoundPlan
from fedtl.strategies.merge import as_sent
from fedtl.strategies.replies import Spec, spec_of
from fedtl.strategies.state import align_server_state
from fedtl.strategies.wrapper import StrategyWrapper


class TravellingKeys(StrategyWrapper):
    """Send each round only the tensors its plan trains, and the plan and fingerprint with them.

    Parameters
    ----------
    strategy : Strategy
        The strategy wrapped.
    plan : Callable[[int], RoundPlan]
        The plan of each round (1-based).
    keys_of : Callable[[Iterable[str]], list[str]]
        State-dict keys of a set of units (``TransferModel.unit_keys``).
    initial_state : Mapping[str, torch.Tensor]
        Every unit's starting tensors (pre-trained blocks, new head), copied here: where a key that joins
        the travelling set starts.
    fingerprint : str
        Fingerprint of the pre-trained backbone; clients refuse to train on a mismatch.
    """

    behaviour = "only travelling tensors are sent and merged"

    def __init__(self, strategy: Strategy, *, plan: Callable[[int], RoundPlan],
                 keys_of: Callable[[Iterable[str]], list[str]], initial_state: Mapping[str, torch.Tensor],
                 fingerprint: str) -> None:
        super().__init__(strategy)
        if not fingerprint:
            raise ValueError("fingerprint must name the backbone the clients check, got an empty string")
        self.plan, self.keys_of, self.fingerprint = plan, keys_of, fingerprint
        self.initial = {k: v.detach().cpu().numpy().copy() for k, v in initial_state.items()}
        self._spec: dict[int, Spec] = {}  # the round in progress -> what its arrays were sent as

    def travelling_arrays(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The ArrayRecord of round ``server_round``: current values, new keys from ``initial_state``."""
        out = ArrayRecord()
        for k in self.keys_of(self.plan(server_round).lrs):
            out[k] = arrays[k] if k in arrays else Array(np.ascontiguousarray(self.initial[k]))
        return out

    def round_config(self, server_round: int, config: ConfigRecord) -> ConfigRecord:
        """``config`` with the round's plan and the backbone fingerprint: what every instruction carries."""
        return ConfigRecord({**config, **self.plan(server_round).to_config(), FINGERPRINT: self.fingerprint})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        record = self.travelling_arrays(server_round, arrays)
        self._spec = {server_round: spec_of(record)}
        align_server_state(self.strategy, record)  # keys that join (gradual unfreezing) start fresh
        return self.strategy.configure_train(server_round, record, self.round_config(server_round, config), grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        spec = self._spec.pop(server_round)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return (None if arrays is None else as_sent(arrays, spec)), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, self.travelling_arrays(server_round, arrays),
                                                self.round_config(server_round, config), grid)
