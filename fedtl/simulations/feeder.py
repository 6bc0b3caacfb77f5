"""The simulation engine's feeder: one scan of the pending instructions a tick, not one per registered node.

Flower 1.42's ``add_messages_to_queue`` (``flwr/server/superlink/fleet/vce/vce_api.py``) asks the link
state for each registered node's next instruction every 0.1 s, and ``InMemoryLinkState.get_message_ins``
scans every stored instruction for each of those calls: O(nodes x instructions) a tick, so a run's cost
grew with the clients that exist rather than those a round trains (at 5,000 registered clients it was
the largest busy share of the driver). This feeder does what Flower's does, each node's oldest
undelivered instruction at most once a tick, marked delivered and queued for the workers, from one scan
of the stored instructions: O(instructions) a tick, whatever the population. It scans as soon as the
server stores an instruction, not at the next tick (Flower's ticks added 50 ms on average to every
``send_and_receive``, a round's queries and its training each): the state's ``store_message_ins`` is
wrapped, for the feeder's lifetime, to wake it.

Flower has no hook for it; like the backend (``fedtl.simulations.backend``), it is swapped in for
Flower's function only while ``fedtl_backend()`` is entered. It reads ``InMemoryLinkState``'s store (the
simulation's state); any other state gets Flower's own feeder.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from queue import Queue
from typing import Any

TICK_S = 0.1  # Flower's own polling interval


def pending(state: Any, nodes: Iterable[int] | Mapping[int, Any]) -> list[Any]:
    """The oldest undelivered instruction of each node of ``nodes`` in ``state`` (an ``InMemoryLinkState``),
    each marked delivered, in the order they were stored; expired or invalid ones are dropped first, as
    ``get_message_ins`` drops them."""
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # noqa: SLF001 - Flower's own expiry check, once a tick
        out, seen = [], set()
        for msg_id in ids:
            msg = state.message_ins_store.get(msg_id)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            node = msg.metadata.dst_node_id
            if node in seen or node not in nodes:
                continue
            seen.add(node)
            out.append(msg)
    delivered_at = now().isoformat()
    for msg in out:
        msg.metadata.delivered_at = delivered_at
    return out


def make_feeder(flower_feeder: Callable[..., None]) -> Callable[..., None]:
    """``add_messages_to_queue`` with one scan a tick where the state is in memory, else ``flower_feeder``."""
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    def add_messages_to_queue(state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, Any],
                              f_stop: threading.Event) -> None:
        if not isinstance(state, InMemoryLinkState):
            flower_feeder(state, queue, nodes_mapping, f_stop)
            return
        stored = threading.Event()
        store = state.store_message_ins

        def store_message_ins(message: Any) -> Any:
            try:
                return store(message)
            finally:
                stored.set()

        state.store_message_ins = store_message_ins
        try:
            while not f_stop.is_set():
                stored.clear()
                for msg in pending(state, nodes_mapping):
                    queue.put(msg)
                stored.wait(TICK_S)  # f_stop is seen within a tick, as in Flower's
        finally:
            del state.store_message_ins  # the class's own again

    return add_messages_to_queue
