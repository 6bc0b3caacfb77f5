"""The simulation engine's feeder: what Flower's per-node polling delivers, from one scan a tick."""

from __future__ import annotations

from typing import Any

import pytest


def _federation(nodes: int) -> tuple[Any, dict[int, int], Any]:
    """A real in-memory link state as Flower's simulation builds it: a run, ``nodes`` registered nodes, a grid."""
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 9, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[9] = Task(task_id=9, run_id=7)
    mapping = _register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


@pytest.fixture
def superlink_identity():  # noqa: ANN201
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1  # messages from the SuperLink
    yield


def _ticks(deliver, state, mapping) -> list[list[int]]:  # noqa: ANN001
    """Each tick's delivered destinations (by partition: node ids are random) until nothing is pending."""
    out = []
    while batch := deliver(state, mapping):
        out.append(sorted(mapping[m.metadata.dst_node_id] for m in batch))
    return out


def test_one_scan_a_tick_delivers_what_flowers_per_node_polling_does(superlink_identity: None) -> None:
    from flwr.app import Message, RecordDict

    from fedtl.simulations.feeder import pending

    def flower(state, mapping):  # noqa: ANN001, ANN202 - Flower 1.42's add_messages_to_queue, one tick
        return [m for node in mapping for m in state.get_message_ins(node_id=node, limit=1)]

    delivered = []
    for deliver in (flower, pending):
        state, mapping, grid = _federation(4)
        a, b, c, _ = mapping
        ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query")
                                       for n in (a, a, b, a, c)]))
        assert len(ids) == 5
        delivered.append(_ticks(deliver, state, mapping))
    # At most one instruction a node a tick, the oldest first; node d, sent nothing, gets nothing.
    assert delivered[1] == delivered[0] == [[0, 1, 2], [0], [0]]


def test_only_registered_nodes_instructions_are_delivered_each_once(superlink_identity: None) -> None:
    from flwr.app import Message, RecordDict

    from fedtl.simulations.feeder import pending

    state, mapping, grid = _federation(3)
    nodes = list(mapping)
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]))
    first = pending(state, nodes[:2])  # the third node is not this engine's
    assert [m.metadata.message_id for m in first] == ids[:2]
    assert all(m.metadata.delivered_at for m in first)
    assert pending(state, nodes[:2]) == []  # delivered once
    assert [m.metadata.message_id for m in pending(state, nodes)] == ids[2:]


def test_the_feeder_is_swapped_in_only_while_the_backend_is() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    from fedtl.simulations.backend import fedtl_backend

    flowers = vce_api.add_messages_to_queue
    with fedtl_backend(limit_s=5):
        assert vce_api.add_messages_to_queue is not flowers
        assert vce_api.add_messages_to_queue.__module__ == "fedtl.simulations.feeder"
    assert vce_api.add_messages_to_queue is flowers


def test_an_instruction_is_fed_when_stored_not_at_the_next_tick(superlink_identity: None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    from queue import Queue

    from flwr.app import Message, RecordDict
    from flwr.server.superlink.fleet.vce import vce_api

    from fedtl.simulations import feeder

    monkeypatch.setattr(feeder, "TICK_S", 3600.0)  # were it fed at the next tick, it would wait an hour
    state, mapping, grid = _federation(2)
    queue: Queue = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=feeder.make_feeder(vce_api.add_messages_to_queue),
                              args=(state, queue, mapping, stop), daemon=True)
    thread.start()
    try:
        for node in mapping:  # each after the feeder has gone to sleep on an empty store
            (msg_id,) = grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type="query")])
            assert queue.get(timeout=60).metadata.message_id == msg_id
    finally:
        stop.set()
        state.store_message_ins(Message(RecordDict(), dst_node_id=next(iter(mapping)), message_type="query"))
        thread.join(timeout=60)
    assert not thread.is_alive() and "store_message_ins" not in vars(state)  # the state's own method again


def test_a_simulations_nodes_are_listed_once_until_one_registers(superlink_identity: None) -> None:
    from fedtl.strategies.grids import RegistrationOrder

    state, mapping, grid = _federation(5)  # registered as Flower's simulation registers them: no heartbeat
    asked = []
    get_nodes = state.get_nodes
    state.get_nodes = lambda run_id: asked.append(run_id) or get_nodes(run_id)
    view = RegistrationOrder(grid)
    assert list(view.get_node_ids()) == list(mapping) == list(view.get_node_ids())  # registration order
    assert len(asked) == 1  # the second answer came without asking the state
    # A node that registers (here with heartbeats, as a deployed one) is seen, and from then on the state is asked.
    late = state.create_node(owner_aid="late", owner_name="late", public_key=b"late" * 8, heartbeat_interval=30)
    state.acknowledge_node_heartbeat(node_id=late, heartbeat_interval=30)
    assert list(view.get_node_ids()) == [*mapping, late]
    view.get_node_ids()
    assert len(asked) == 3
