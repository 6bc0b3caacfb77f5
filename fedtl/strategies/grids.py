"""Views of Flower's Grid that leave some nodes out of sampling (the strategy samples from ``get_node_ids``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class FilteredGrid(Grid):
    """``grid`` with ``get_node_ids`` passed through ``keep``; everything else goes to ``grid`` unchanged."""

    def __init__(self, grid: Grid, keep: Callable[[list[int]], list[int]]) -> None:
        self.grid = grid
        self.keep = keep

    def get_node_ids(self) -> Iterable[int]:
        return self.keep(list(self.grid.get_node_ids()))

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RegistrationOrder(FilteredGrid):
    """``grid`` with its node ids in the order the nodes registered, so that a seed samples the same nodes in
    every process. Flower's in-memory state (a simulation's) returns them as a set of random ids, whose order
    differs from run to run, and so did whom ``random.sample`` picked; registration order is partition order.
    Any other grid (a deployment's, whose node ids are the nodes' own): sorted."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid, self._ordered)
        self._static: tuple[int, list[int]] | None = None  # (nodes registered, their ids in order)

    def get_node_ids(self) -> Iterable[int]:
        """The nodes, in registration order. A simulation's nodes never go offline (Flower registers them with
        no heartbeat) and never leave: while no node registers, the last answer stands. Flower's in-memory
        state builds every node's record to answer (0.3 s a round at 100,000 nodes, asked several times a
        round); any other state is asked every time."""
        from flwr.common.constant import HEARTBEAT_INTERVAL_INF

        registered = getattr(getattr(self.grid, "state", None), "nodes", None)
        if not isinstance(registered, dict):
            return super().get_node_ids()
        if self._static is not None and self._static[0] == len(registered):
            return list(self._static[1])
        ids = list(super().get_node_ids())
        if len(ids) == len(registered) and all(
                registered[n].heartbeat_interval >= HEARTBEAT_INTERVAL_INF for n in ids):
            self._static = (len(registered), ids)
        return list(ids)

    def _ordered(self, ids: list[int]) -> list[int]:
        registered = getattr(getattr(self.grid, "state", None), "nodes", None)  # InMemoryLinkState.nodes: a dict
        if isinstance(registered, dict):
            present = set(ids)
            # list() copies the keys in one step: under `flwr run .` (no wait for the population) Flower may still
            # be registering nodes, and iterating the dict itself would fail when one is added meanwhile.
            return [n for n in list(registered) if n in present]
        return sorted(ids)
