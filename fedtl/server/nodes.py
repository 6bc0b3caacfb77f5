"""Which nodes train: views of Flower's Grid that leave some nodes out of sampling.

``FilteredGrid`` leaves out whatever its filter drops (e.g. nodes whose privacy budget
is spent). ``TrainingNodes`` leaves out the nodes held out of training: the server cannot
see a node's config, so it asks each node once (a Flower ``query`` message) whether it is
held out. Held-out nodes still get the final evaluation (the adaptability figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.supercore.run import Run
from flwr.serverapp import Grid


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


class TrainingNodes(FilteredGrid):
    """``grid`` as training sees it: ``get_node_ids`` leaves out held-out nodes.

    Parameters
    ----------
    grid : Grid
        The run's grid.
    timeout : float
        Seconds to wait for nodes to answer the query.
    """

    def __init__(self, grid: Grid, timeout: float) -> None:
        super().__init__(grid, self._training)
        self.timeout = timeout
        self.held_out: dict[int, bool] = {}

    def _training(self, ids: list[int]) -> list[int]:
        new = [n for n in ids if n not in self.held_out]
        if new:
            self._ask(new)
        return [n for n in ids if self.held_out.get(n) is False]  # unanswered nodes do not train

    def _ask(self, nodes: list[int]) -> None:
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        answered = set()
        for reply in self.grid.send_and_receive(queries, timeout=self.timeout):
            if reply.has_error() or "metrics" not in reply.content.metric_records:
                continue
            self.held_out[reply.metadata.src_node_id] = bool(reply.content["metrics"].get("held-out", 0))
            answered.add(reply.metadata.src_node_id)
        for n in set(nodes) - answered:
            # Asked again next round; meanwhile it does not train: an unknown role is not a training role.
            log(WARNING, "node %s did not say whether it is held out of training; not training it this round", n)
