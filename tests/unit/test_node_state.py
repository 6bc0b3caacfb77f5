"""Simulated nodes' state on disk: what a resumed run's nodes get back (``fedtl.simulations.node_state``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtl.protocol import CONFIG, LOCAL_STATE, PARTITION_ID, PRIVACY_STATE, SERVER_ROUND
from fedtl.simulations.node_state import NodeStates


def context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={PARTITION_ID: partition}, state=RecordDict(),
                   run_config={})


def train(rnd: int) -> Message:
    return Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: rnd})}), dst_node_id=1,
                   message_type=MessageType.TRAIN)


def run_round(states: NodeStates, ctx: Context, rnd: int) -> None:
    """What a FedPer client under DP-SGD does in round ``rnd``: its head moves, its spend grows."""
    states.restore(ctx)
    ctx.state[LOCAL_STATE] = ArrayRecord({"head.bias": Array(np.full(3, float(rnd), np.float32))})
    ctx.state[PRIVACY_STATE] = ConfigRecord({"history.steps": [10] * rnd})
    states.keep(train(rnd), ctx)


def head(ctx: Context) -> float:
    return float(ctx.state[LOCAL_STATE]["head.bias"].numpy()[0])


def files(run: Path, partition: int = 0) -> list[str]:
    return sorted(p.name for p in (run / "node-state" / f"partition-{partition}").iterdir())


def test_a_resumed_node_gets_its_state_after_the_checkpointed_round_and_every_step_it_spent(tmp_path: Path, task_identity: None) -> None:
    killed = NodeStates(tmp_path, checkpoint_every=1)
    ctx = context(0)
    for rnd in (1, 2, 3):  # round 3 ran on the node, then the server was killed before its checkpoint
        run_round(killed, ctx, rnd)
    assert files(tmp_path) == ["round-2.recorddict", "round-3.recorddict"]  # round 1's is no longer needed

    resumed = NodeStates(tmp_path, checkpoint_every=1, resume_round=2)
    again = context(0)
    resumed.restore(again)
    assert head(again) == 2.0  # round 3's head was lost with the round, which runs again
    assert list(again.state[PRIVACY_STATE]["history.steps"]) == [10] * 3  # round 3's spend was not
    # Folded into round 2's file before round 3's went: a run killed again while resuming finds the same.
    assert files(tmp_path) == ["round-2.recorddict"]
    twice = context(0)
    NodeStates(tmp_path, checkpoint_every=1, resume_round=2).restore(twice)
    assert head(twice) == 2.0 and list(twice.state[PRIVACY_STATE]["history.steps"]) == [10] * 3


def test_only_a_node_that_ran_gets_state_and_only_before_its_first_message(tmp_path: Path, task_identity: None) -> None:
    states = NodeStates(tmp_path, checkpoint_every=1)
    run_round(states, context(0), 1)
    resumed = NodeStates(tmp_path, checkpoint_every=1, resume_round=1)
    other = context(1)
    resumed.restore(other)
    assert not len(other.state)  # partition 1 never ran: it starts afresh
    ctx = context(0)
    resumed.restore(ctx)
    ctx.state[LOCAL_STATE] = ArrayRecord({"head.bias": Array(np.full(3, 7.0, np.float32))})
    resumed.restore(ctx)  # a later message: the state it has now stays
    assert head(ctx) == 7.0


def test_states_are_written_only_when_they_change_and_kept_only_while_a_resume_can_ask_for_them(tmp_path: Path, task_identity: None) -> None:
    states = NodeStates(tmp_path, checkpoint_every=3)
    ctx = context(0)
    for rnd in range(1, 6):
        run_round(states, ctx, rnd)
    # Checkpoints after rounds 3 and 6: while round 5 runs, round 3's state or a later one is what a resume needs.
    assert files(tmp_path) == ["round-3.recorddict", "round-4.recorddict", "round-5.recorddict"]
    evaluate = Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 6})}), dst_node_id=1,
                       message_type=MessageType.EVALUATE)
    states.keep(evaluate, ctx)  # the same state: no new file
    assert files(tmp_path)[-1] == "round-5.recorddict"
    none = NodeStates(tmp_path / "never", checkpoint_every=0)  # no resume checkpoint, so no node state either
    run_round(none, context(0), 1)
    assert not (tmp_path / "never").exists()
