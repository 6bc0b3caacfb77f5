"""Simulated nodes' state on disk, so that a resumed run gets it back.

A node's ``context.state`` (its personal layers, its DP-SGD accountant: ``protocol`` names the
records) lives in Flower's simulation engine, in this process: when the run is killed it is gone.
So the backend (``fedtl.simulations.backend``) writes each node's state after every message that
changed it, to ``<run>/node-state/partition-<p>/round-<r>.recorddict``, and a resumed run's
backend puts it back into the node's context before the node's first message. It is done here,
in the driver, rather than in the clients: the driver holds the contexts, and its disk is the run
folder's, also when the clients run on a Ray cluster's other machines.

**Which round comes back.** A run resumed after round ``R`` replays every later round, so a node
gets the state it had after round ``R``: the rounds after it were lost with the process, and
their personal layers with them. Privacy spend is the exception (``protocol.SPENT_STATE``): a
DP-SGD round that ran before the kill released its noisy update, so its steps stay in the
node's accountant even though the round runs again. A resumed DP-SGD run can therefore end with
more ε spent than the uninterrupted run of the same seed, never less.

**What is kept.** A node's files of rounds up to the latest checkpointed one are needed only for
the newest of them; older ones are deleted as the run goes. ``checkpoint-every = 0`` (no resume
checkpoint) writes nothing.

The files are Flower's own protobuf encoding of a ``RecordDict`` (what travels in its messages),
not pickle.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtl.config import ExperimentConfig
from fedtl.errors import RunFolderError
from fedtl.protocol import CONFIG, PARTITION_ID, SERVER_ROUND, SPENT_STATE
from fedtl.reports.runs import write_atomic
from fedtl.run_folder import NODE_STATE_DIR

_FILE = re.compile(r"round-(\d+)\.recorddict")


def encode(state: RecordDict) -> bytes:
    """``state`` in Flower's protobuf encoding."""
    return recorddict_to_proto(state).SerializeToString()


def decode(data: bytes) -> RecordDict:
    """Inverse of ``encode``."""
    return recorddict_from_proto(ProtoRecordDict.FromString(data))


class NodeStates:
    """The node-state folder of one simulated run (see the module).

    Parameters
    ----------
    run_dir : Path
        The run folder; the states go to its ``node-state/``.
    checkpoint_every : int
        The run's ``checkpoint-every``: which rounds' states a resume can still ask for; 0 keeps none.
    resume_round : int, optional
        A resumed run's checkpoint round: each node's state after it comes back (its spend from
        the latest round it ran).
    """

    def __init__(self, run_dir: Path, *, checkpoint_every: int, resume_round: int | None = None) -> None:
        self.folder = Path(run_dir) / NODE_STATE_DIR
        self.every = checkpoint_every
        self.written: dict[str, bytes] = {}  # per node: the digest of its latest file, to skip unchanged states
        self.restored: dict[str, RecordDict] = {}
        if resume_round is not None:
            for node in sorted(p.name for p in self.folder.glob("partition-*")):
                self.restored[node] = self._fold(node, resume_round)

    def _rounds(self, node: str) -> dict[int, Path]:
        found = ((_FILE.fullmatch(p.name), p) for p in (self.folder / node).glob("round-*.recorddict"))
        return {int(m.group(1)): p for m, p in found if m}

    def _fold(self, node: str, resume_round: int) -> RecordDict:
        """The state ``node`` resumes with: the latest of rounds ≤ ``resume_round``, with the spend of the
        latest round it ran. Written back as its round-``resume_round`` file before the lost rounds' files go,
        so a run killed again while resuming finds the same state."""
        rounds = self._rounds(node)
        kept = [r for r in rounds if r <= resume_round]
        state = decode(rounds[max(kept)].read_bytes()) if kept else RecordDict()
        lost = [r for r in rounds if r > resume_round]
        if lost:
            latest = decode(rounds[max(lost)].read_bytes())
            for key in SPENT_STATE:
                if key in latest:
                    state[key] = latest[key]
            write_atomic(self.folder / node / f"round-{resume_round}.recorddict", encode(state))
            for r in lost:
                rounds[r].unlink()
        return state

    def restore(self, context: Context) -> None:
        """Before a node's first message in a resumed run: put back the state it had (nothing otherwise)."""
        state = self.restored.pop(_node(context), None)
        if state is not None and not len(context.state):
            for key, record in state.items():
                context.state[key] = record

    def keep(self, message: Message, context: Context) -> None:
        """After ``message`` was handled: write the node's state for the message's round, if it changed."""
        if not self.every or not len(context.state) or CONFIG not in message.content.config_records:
            return
        config = message.content.config_records[CONFIG]
        if SERVER_ROUND not in config:
            return
        node, rnd = _node(context), int(config[SERVER_ROUND])
        data = encode(context.state)
        digest = hashlib.sha256(data).digest()
        if self.written.get(node) == digest:
            return
        (self.folder / node).mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / node / f"round-{rnd}.recorddict", data)
        self.written[node] = digest
        self._prune(node, rnd)

    def _prune(self, node: str, rnd: int) -> None:
        # While round `rnd` runs, every round before it has ended and written its checkpoint when one was
        # due: the latest checkpoint is at least the last multiple of `every` before `rnd`. Of the files
        # up to it, a resume can need only the newest.
        checkpointed = (rnd - 1) // self.every * self.every
        old = sorted(r for r in self._rounds(node) if r <= checkpointed)
        for r in old[:-1]:
            (self.folder / node / f"round-{r}.recorddict").unlink(missing_ok=True)


def _node(context: Context) -> str:
    return f"partition-{context.node_config[PARTITION_ID]}"


def keeps_node_state(cfg: ExperimentConfig) -> list[str]:
    """What the clients of ``cfg`` keep between rounds in their node state (empty: nothing)."""
    from fedtl.personalisation import run_model  # builds a model: torch
    from fedtl.privacy import privacy_mode

    model = run_model(cfg.replace(init="scratch"))
    return [what for what, keeps in (("a DP-SGD accountant", privacy_mode(cfg).per_sample),
                                     ("personal layers", bool(model.local_keys))) if keeps]


def check_resumable(cfg: ExperimentConfig) -> None:
    """Refuse to resume a run whose clients keep node state when its ``node-state/`` folder is gone: its nodes
    would start afresh (a DP-SGD client's spend from zero: a false guarantee).

    Raises
    ------
    RunFolderError
        Naming what the clients keep.
    """
    kept = keeps_node_state(cfg)
    if kept and not (Path(cfg.out) / NODE_STATE_DIR).is_dir():
        raise RunFolderError(f"{cfg.out} cannot be resumed: its clients keep {' and '.join(kept)} in their node "
                             f"state, and its {NODE_STATE_DIR}/ folder, where those were kept, is missing. Start the "
                             "run again (--overwrite)")
