"""Which nodes train, and what each declared: ``TrainingNodes`` keeps the nodes' answers, ``Roster.settle`` trains
only the nodes that train.

The server cannot see a node's config or data, so it asks a node (a Flower ``query`` message) whether
it is held out and how many training examples it holds when the node is first sampled, never every
node up front: a run's cost grows with the clients its rounds train, not with the clients that exist.
A training reply may weigh no more than the node declared. A node at its own LoRA rank says which
(HetLoRA). A sampled node that cannot train (held out, or silent when asked) is replaced by another
drawn from the rest (``Roster.settle``), so a round trains as many nodes as its strategy sampled (at
most the config's ``sampled_clients``). Held-out nodes still get the final evaluation (the adaptability figures).
A node that answers with an error (its data unreadable) trains, so that its training error, which
names the fix, is recorded; its replies are refused until it declares a count (it is asked again
each time it is sampled). A node that does not answer is not trained that round.
"""

from __future__ import annotations

import random
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtl.protocol import HELD_OUT, LORA_RANK, METRICS, NUM_EXAMPLES, PARTITION_ID
from fedtl.strategies.grids import FilteredGrid


class TrainingNodes(FilteredGrid):
    """``grid`` as training sees it, with what each node answered when asked (``Roster.settle`` trains only those
    that train).

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
        self.examples: dict[int, int] = {}  # node -> the training examples it declared
        self.partitions: dict[int, int] = {}  # node -> its partition, in simulation (how the records name it)
        self.ranks: dict[int, int] = {}  # node -> its own LoRA rank, where it declared one

    def uncounted(self, node: int) -> bool:
        """Whether ``node`` trains but answered without a count of its examples (its data could not be read)."""
        return self.held_out.get(node) is False and node not in self.examples

    def _training(self, ids: list[int]) -> list[int]:
        # Every node, held-out ones known or not: were the ones known to be held out left out, whom a round
        # samples would depend on what the server happened to have asked, and a resumed run (which knows
        # nothing yet) would sample other nodes than the uninterrupted one. ``Roster.settle`` replaces them.
        return ids

    def trains(self, node: int) -> bool:
        """Whether ``node`` answered that it trains (an unanswered or unasked node does not, yet)."""
        return self.held_out.get(node) is False

    def needs_asking(self, node: int) -> bool:
        """Whether ``node`` is to be asked when sampled: never asked, silent, or no count declared (its data may
        be readable now)."""
        return node not in self.held_out or self.uncounted(node)

    def ask(self, nodes: list[int]) -> None:
        """Ask ``nodes`` whether they are held out, and what they hold."""
        if nodes:
            self._ask(nodes)

    def _ask(self, nodes: list[int]) -> None:
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        answered = set()
        for reply in self.grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or METRICS not in reply.content.metric_records:
                # It is up but cannot answer (its data unreadable, an app without a query handler): it
                # is sampled, so that its training error is recorded rather than the round waiting for it.
                if node not in self.held_out:
                    why = reply.error.reason if reply.has_error() else "a reply without metrics"
                    log(WARNING, "node %s could not say whether it is held out of training (%s); sampling it",
                        node, why)
                self.held_out[node] = False
                self.examples.pop(node, None)
                answered.add(node)
                continue
            metrics = reply.content[METRICS]
            self.held_out[node] = bool(metrics.get(HELD_OUT, 0))
            if isinstance(metrics.get(PARTITION_ID), int):
                self.partitions[node] = metrics[PARTITION_ID]
            if isinstance(metrics.get(LORA_RANK), int):
                self.ranks[node] = metrics[LORA_RANK]
            if isinstance(metrics.get(NUM_EXAMPLES), int):
                self.examples[node] = metrics[NUM_EXAMPLES]
            else:
                self.examples.pop(node, None)
            answered.add(node)
        for n in set(nodes) - answered:
            # Asked again next round; meanwhile it does not train: an unknown role is not a training role.
            log(WARNING, "node %s did not say whether it is held out of training; not training it this round", n)


class Roster:
    """What the run knows of its nodes, shared by the wrappers that sample, check and cut for them: one
    ``TrainingNodes`` view per grid (the answers its nodes gave), and the nodes that declined for good.

    Parameters
    ----------
    timeout : float, optional
        Seconds to wait for nodes to answer the query; ``None``: nodes are not asked, every node trains
        and nothing is declared.
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.views: dict[int, TrainingNodes] = {}
        self.declined: dict[int, str] = {}  # node -> why it trains no more

    def view(self, grid: Grid) -> Grid:
        """``grid`` as training sees it: one view (and its answers) per grid."""
        if self.timeout is None:
            return grid
        return self.views.setdefault(id(grid), TrainingNodes(grid, self.timeout))

    def settle(self, messages: list[Message], grid: Grid, most: int | None = None,
               rng: random.Random | None = None) -> list[Message]:
        """The round's training ``messages`` (sampled from ``grid``, a ``view``) to nodes that train, at most
        ``most`` of them: the nodes sampled for the first time are asked now, and one that cannot train is
        replaced by another drawn from ``grid`` with ``rng`` (default: Python's ``random``).

        ``rng`` is the round's own generator, not the process's ``random``: asking nodes may start a
        simulation's actors, and Ray draws from ``random`` as they start, so a resumed run (whose first round
        starts them) drew other replacements than the uninterrupted run.

        ``most`` (the config's clients a round trains) keeps the round's size a fraction of the nodes that
        train: the strategy sampled a fraction of every node, held-out ones included."""
        if self.timeout is None or not messages:
            return messages
        view = self._view_of(grid)
        if view is None:
            return messages
        wanted = len(messages) if most is None else min(len(messages), most)
        chosen = [m.metadata.dst_node_id for m in messages]
        view.ask([n for n in chosen if view.needs_asking(n)])
        kept = [m for m in messages if view.trains(m.metadata.dst_node_id)][:wanted]
        if len(kept) == wanted:
            return kept
        taken = set(chosen)
        pool = [n for n in grid.get_node_ids() if n not in taken]  # the grid's order: the draw depends on the seed
        template = messages[0]
        while len(kept) < wanted and pool:
            drawn = (rng or random).sample(pool, min(wanted - len(kept), len(pool)))
            gone = set(drawn)
            pool = [n for n in pool if n not in gone]
            view.ask([n for n in drawn if view.needs_asking(n)])
            kept += [Message(template.content, dst_node_id=n, message_type=template.metadata.message_type)
                     for n in drawn if view.trains(n)]
        return kept

    def _view_of(self, grid: Grid) -> TrainingNodes | None:
        """The ``TrainingNodes`` view ``grid`` is, or is a view of."""
        while isinstance(grid, FilteredGrid):
            if isinstance(grid, TrainingNodes):
                return grid
            grid = grid.grid
        return None

    def decline(self, node: int, reason: str) -> None:
        """``node`` declined to train (its privacy budget is spent): it is not sampled again."""
        self.declined[node] = reason

    def uncounted(self, node: int) -> bool:
        """Whether ``node`` trains but declared no count of its examples when asked (``TrainingNodes.uncounted``)."""
        return any(view.uncounted(node) for view in self.views.values())

    @property
    def examples(self) -> dict[int, int]:
        """Node -> the training examples it declared, from every view that asked."""
        return {n: e for view in self.views.values() for n, e in view.examples.items()}

    @property
    def partitions(self) -> dict[int, int]:
        """Node -> its partition (in simulation), from every view that asked."""
        return {n: p for view in self.views.values() for n, p in view.partitions.items()}

    @property
    def ranks(self) -> dict[int, int]:
        """Node -> the LoRA rank it declared, from every view that asked."""
        return {n: r for view in self.views.values() for n, r in view.ranks.items()}
