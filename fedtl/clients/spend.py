"""A DP-SGD client's spend: its ``PrivacyState``, where its node keeps it, and the checks before it trains.

The state lives in the node's records for the run (Flower's ``Context.state``) and, where the node's owner
names a ``state-dir``, in a file there, so a restarted SuperNode still knows what it has spent. Before a
round trains, ``reserve_round`` checks the run's budget and the node's own lifetime cap and records the
round as spent, under the folder's lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from flwr.app import ConfigRecord, Context, RecordDict, UserConfigValue

from fedtl.accounting import (
    History,
    compose,
    replace_one_sample_epsilon,
    sample_epsilon,
    sample_level_start,
    steps_per_round,
)
from fedtl.config import FinetuneConfig, PrivacyConfig
from fedtl.errors import BudgetSpentError, DPConfigError
from fedtl.protocol import (
    NODE_MAX_EPSILON,
    NODE_MAX_EPSILON_DELTA,
    PRIVACY_DELTA,
    PRIVACY_EPSILON,
    PRIVACY_NOISE,
    PRIVACY_SAMPLE_RATE,
    PRIVACY_STATE,
    PRIVACY_STEPS,
    STATE_DIR,
    RoundPlan,
)


@dataclass
class PrivacyState:
    """What a client keeps between rounds: its noise level and accountant history."""

    noise_multiplier: float
    sample_rate: float
    history: History = field(default_factory=list)

    def to_record(self) -> ConfigRecord:
        """As a ConfigRecord for the node's ``context.state``."""
        return ConfigRecord({
            "noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate,
            "history.sigma": [h[0] for h in self.history], "history.rate": [h[1] for h in self.history],
            "history.steps": [h[2] for h in self.history],
        })

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyState:
        """Inverse of ``to_record``."""
        sig, rate, steps = (list(record[k]) for k in ("history.sigma", "history.rate", "history.steps"))
        return cls(float(record["noise-multiplier"]), float(record["sample-rate"]),
                   [(float(s), float(r), int(n)) for s, r, n in zip(sig, rate, steps, strict=True)])

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(n for _, _, n in self.history)


@dataclass(frozen=True)
class NodeState:
    """What of a node's Flower ``Context`` its spend needs: the node's records for the run (``state``, kept
    by Flower between rounds), its owner's ``node_config`` (``state-dir``, ``max-epsilon``) and the run's id
    (the name of its state file)."""

    state: RecordDict
    node_config: Mapping[str, UserConfigValue]
    run_id: int

    @classmethod
    def of(cls, context: Context) -> NodeState:
        """The parts of ``context`` a round's spend reads and writes (its records by reference)."""
        return cls(context.state, context.node_config, context.run_id)


def _state_file(node: NodeState) -> Path | None:
    # Deployment: a node that names a state folder keeps its spend on its own disk, so a
    # restarted SuperNode still knows what it has spent in this run.
    folder = node.node_config.get(STATE_DIR)
    return Path(str(folder)) / f"run-{node.run_id}-privacy.json" if folder else None


def _read_state(path: Path) -> PrivacyState:
    raw = json.loads(path.read_text())
    return PrivacyState(raw["noise_multiplier"], raw["sample_rate"], [tuple(h) for h in raw["history"]])


def load_state(node: NodeState) -> PrivacyState | None:
    """The client's privacy state from ``node.state`` (or its state file), ``None`` before round one."""
    if PRIVACY_STATE in node.state.config_records:
        return PrivacyState.from_record(node.state.config_records[PRIVACY_STATE])
    path = _state_file(node)
    if path is not None and path.exists():
        return _read_state(path)
    return None


def save_state(node: NodeState, state: PrivacyState) -> None:
    """Keep ``state`` in ``node.state`` (and the node's state file, when it has one)."""
    node.state.config_records[PRIVACY_STATE] = state.to_record()
    path = _state_file(node)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"noise_multiplier": state.noise_multiplier, "sample_rate": state.sample_rate,
                                   "history": state.history}))
        tmp.replace(path)


def initial_state(p: PrivacyConfig, ft: FinetuneConfig, rounds: int, num_examples: int) -> PrivacyState:
    """The state of a client about to train for the first time: its noise multiplier and sample rate
    (``fedtl.accounting.sample_level_start``; ``rounds``: the run's planned rounds).

    Raises
    ------
    DPConfigError
        If no noise level reaches ``target-epsilon``.
    """
    try:
        return PrivacyState(*sample_level_start(p, ft, rounds, num_examples))
    except ValueError as err:
        raise DPConfigError(f"{err}: raise the target, or lower rounds or local-epochs") from err


def round_steps(state: PrivacyState, plan: RoundPlan) -> int:
    """DP-SGD steps one round of ``plan`` takes."""
    return steps_per_round(plan.local_epochs, state.sample_rate)


def check_budget(state: PrivacyState, plan: RoundPlan, p: PrivacyConfig) -> None:
    """Raise ``BudgetSpentError`` if this round would take the client past ``p.budget``."""
    if p.budget is None:
        return
    after = sample_epsilon(compose(state.history, state.noise_multiplier, state.sample_rate, round_steps(state, plan)),
                           accountant=p.accountant, delta=p.delta)
    if after > p.budget:
        spent = sample_epsilon(state.history, accountant=p.accountant, delta=p.delta)
        raise BudgetSpentError(
            f"privacy budget spent: epsilon {spent:.4g} so far, {after:.4g} after this round, budget {p.budget:g} "
            f"(delta {p.delta:g}); this client trains no more in this run", privacy_metrics(state, p),
        )


LOCK_FILE = ".privacy.lock"  # in a node's state-dir: every run's check-and-spend takes it


@contextmanager
def spend_lock(node: NodeState) -> Iterator[None]:
    """Hold this node's ``state-dir`` lock (a file lock: every process and run sharing the folder waits for it),
    so that reading the spend, checking the cap and recording the round are one step. No folder: no lock
    (the spend lives in this process's ``node.state`` alone)."""
    folder = node.node_config.get(STATE_DIR)
    if not folder:
        yield
        return
    Path(str(folder)).mkdir(parents=True, exist_ok=True)
    with FileLock(str(Path(str(folder)) / LOCK_FILE)):
        yield


def node_epsilon(history: History, delta: float) -> float:
    """The node owner's own figure of a spend: replace-one ε at the owner's ``delta``
    (``fedtl.accounting.replace_one_sample_epsilon``), the adjacency that holds with the count published."""
    return replace_one_sample_epsilon(history, delta=delta)


def check_node_budget(state: PrivacyState, plan: RoundPlan, p: PrivacyConfig, node: NodeState) -> None:
    """Raise ``BudgetSpentError`` if this round would take the node past its own cap (node config
    ``max-epsilon``, at ``max-epsilon-delta``), over every run in its ``state-dir``, whatever the server's
    config says. The node's own figure (``node_epsilon``): replace-one ε at its own delta, whichever accountant
    the run uses. Call it under ``spend_lock``, and record the round before letting the lock go.

    Raises
    ------
    DPConfigError
        If the node caps its spend but names no ``state-dir`` to count it in.
    """
    if NODE_MAX_EPSILON not in node.node_config:
        return
    cap = float(node.node_config[NODE_MAX_EPSILON])
    delta = float(node.node_config.get(NODE_MAX_EPSILON_DELTA, 1e-5))
    mine = _state_file(node)
    if mine is None:
        raise DPConfigError(f"this node caps its lifetime epsilon ({NODE_MAX_EPSILON} = {cap:g}) but keeps no record "
                            f"of its spend: start its SuperNode with --node-config \"{STATE_DIR}='/a/folder'\" too")
    earlier = [h for f in sorted(mine.parent.glob("run-*-privacy.json")) if f != mine for h in _read_state(f).history]
    lifetime = [*earlier, *state.history]
    after = node_epsilon(compose(lifetime, state.noise_multiplier, state.sample_rate, round_steps(state, plan)), delta)
    if after > cap:
        spent = node_epsilon(lifetime, delta)
        raise BudgetSpentError(
            f"this node's own privacy budget is spent: epsilon {spent:.4g} over every run so far, {after:.4g} after "
            f"this round, its cap {NODE_MAX_EPSILON} = {cap:g} (delta {delta:g}, replace-one); it trains no more",
            privacy_metrics(state, p))


def reserve_round(state: PrivacyState, plan: RoundPlan, p: PrivacyConfig, node: NodeState) -> None:
    """Check the run's budget and the node's cap, and record the round's steps as spent before training, all
    under ``spend_lock``: two runs sharing a ``state-dir`` cannot both pass the cap on the same headroom. A round
    that then fails stays spent (it may have released something; spend is never rolled back).

    Raises
    ------
    BudgetSpentError
        If the round would pass the run's budget or the node's cap; nothing is recorded.
    """
    check_budget(state, plan, p)
    with spend_lock(node):
        check_node_budget(state, plan, p, node)
        save_state(node, PrivacyState(state.noise_multiplier, state.sample_rate,
                                      compose(state.history, state.noise_multiplier, state.sample_rate,
                                              round_steps(state, plan))))


def privacy_metrics(state: PrivacyState, p: PrivacyConfig) -> dict[str, float | int]:
    """What a client reports of its spend: cumulative epsilon at delta, steps, noise and sample rate."""
    return {
        PRIVACY_EPSILON: sample_epsilon(state.history, accountant=p.accountant, delta=p.delta),
        PRIVACY_DELTA: p.delta, PRIVACY_STEPS: state.steps,
        PRIVACY_NOISE: state.noise_multiplier, PRIVACY_SAMPLE_RATE: state.sample_rate,
    }
