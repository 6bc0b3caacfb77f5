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
