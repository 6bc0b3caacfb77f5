"""Sample-level DP on a client: DP-SGD with Opacus, accounted over the whole run.

Each round Opacus wraps the model afresh (the trainable set may change between rounds,
as under gradual unfreezing), but the accountant is restored from the client's
``PrivacyState``, so the epsilon reported is the client's total spend so far.

Why the trainable set may change without breaking the accounting: a DP-SGD step
releases one noised sum of per-sample gradients clipped to ``max-grad-norm`` as a
whole vector, whatever parameters it spans; its privacy cost depends only on the noise
multiplier and the sample rate. Frozen blocks are public (pre-trained) and run in eval
mode, so no example influences them.

The noise comes from fresh operating-system entropy, never from the run's seed: the
server knows that seed and could regenerate (and subtract) seeded noise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from flwr.app import ConfigRecord, Context
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.accounting import (
    History,
    client_start,
    compose,
    poisson_schedule,
    replace_one_sample_epsilon,
    sample_epsilon,
    steps_per_round,
)
from fedtl.clients.trainer import TrainResult
from fedtl.config import ExperimentConfig, PrivacyConfig
from fedtl.data.rows import LabelledImages
from fedtl.errors import BudgetSpentError, DPConfigError
from fedtl.models.features import PLAIN, Feed, feed
from fedtl.models.transfer import TransferModel
from fedtl.privacy import check_dp_trainable
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
from fedtl.seeds import derived_seed


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


def _state_file(context: Context) -> Path | None:
    # Deployment: a node that names a state folder keeps its spend on its own disk, so a
    # restarted SuperNode still knows what it has spent in this run.
    folder = context.node_config.get(STATE_DIR)
    return Path(str(folder)) / f"run-{context.run_id}-privacy.json" if folder else None


def _read_state(path: Path) -> PrivacyState:
    raw = json.loads(path.read_text())
    return PrivacyState(raw["noise_multiplier"], raw["sample_rate"], [tuple(h) for h in raw["history"]])


def load_state(context: Context) -> PrivacyState | None:
    """The client's privacy state from ``context.state`` (or its state file), ``None`` before round one."""
    if PRIVACY_STATE in context.state.config_records:
        return PrivacyState.from_record(context.state.config_records[PRIVACY_STATE])
    path = _state_file(context)
    if path is not None and path.exists():
        return _read_state(path)
    return None


def save_state(context: Context, state: PrivacyState) -> None:
    """Keep ``state`` in ``context.state`` (and the node's state file, when it has one)."""
    context.state.config_records[PRIVACY_STATE] = state.to_record()
    path = _state_file(context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"noise_multiplier": state.noise_multiplier, "sample_rate": state.sample_rate,
                                   "history": state.history}))
        tmp.replace(path)


def initial_state(cfg: ExperimentConfig, num_examples: int) -> PrivacyState:
    """The state of a client about to train for the first time: its noise multiplier and sample rate
    (``fedtl.accounting.client_start``).

    Raises
    ------
    DPConfigError
        If no noise level reaches ``target-epsilon``.
    """
    try:
        return PrivacyState(*client_start(cfg, num_examples))
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
def spend_lock(context: Context) -> Iterator[None]:
    """Hold this node's ``state-dir`` lock (a file lock: every process and run sharing the folder waits for it),
    so that reading the spend, checking the cap and recording the round are one step. No folder: no lock
    (the spend lives in this process's ``context.state`` alone)."""
    folder = context.node_config.get(STATE_DIR)
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


def check_node_budget(state: PrivacyState, plan: RoundPlan, p: PrivacyConfig, context: Context) -> None:
    """Raise ``BudgetSpentError`` if this round would take the node past its own cap (node config
    ``max-epsilon``, at ``max-epsilon-delta``), over every run in its ``state-dir``, whatever the server's
    config says. The node's own figure (``node_epsilon``): replace-one ε at its own delta, whichever accountant
    the run uses. Call it under ``spend_lock``, and record the round before letting the lock go.

    Raises
    ------
    DPConfigError
        If the node caps its spend but names no ``state-dir`` to count it in.
    """
    if NODE_MAX_EPSILON not in context.node_config:
        return
    cap = float(context.node_config[NODE_MAX_EPSILON])
    delta = float(context.node_config.get(NODE_MAX_EPSILON_DELTA, 1e-5))
    mine = _state_file(context)
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


def reserve_round(state: PrivacyState, plan: RoundPlan, p: PrivacyConfig, context: Context) -> None:
    """Check the run's budget and the node's cap, and record the round's steps as spent before training, all
    under ``spend_lock``: two runs sharing a ``state-dir`` cannot both pass the cap on the same headroom. A round
    that then fails stays spent (it may have released something; spend is never rolled back).

    Raises
    ------
    BudgetSpentError
        If the round would pass the run's budget or the node's cap; nothing is recorded.
    """
    check_budget(state, plan, p)
    with spend_lock(context):
        check_node_budget(state, plan, p, context)
        save_state(context, PrivacyState(state.noise_multiplier, state.sample_rate,
                                         compose(state.history, state.noise_multiplier, state.sample_rate,
                                                 round_steps(state, plan))))


def privacy_metrics(state: PrivacyState, p: PrivacyConfig) -> dict[str, float | int]:
    """What a client reports of its spend: cumulative epsilon at delta, steps, noise and sample rate."""
    return {
        PRIVACY_EPSILON: sample_epsilon(state.history, accountant=p.accountant, delta=p.delta),
        PRIVACY_DELTA: p.delta, PRIVACY_STEPS: state.steps,
        PRIVACY_NOISE: state.noise_multiplier, PRIVACY_SAMPLE_RATE: state.sample_rate,
    }


def dp_generators(device: torch.device,
                  noise: torch.Generator | None = None) -> tuple[torch.Generator, torch.Generator]:
    """The generators of a DP-SGD round: Opacus's noise (on ``device``, where it draws the noise) and the
    Poisson sampler's (on the CPU), as independent streams.

    Were they one seed's streams, whether a record was sampled would show in the size of the noise,
    and the accountant's epsilon would not hold. ``noise`` given (tests): the sampler's seed is derived
    from its seed by a named stream, so the round is reproducible; else both seeds come from ``os.urandom``.
    """
    def fresh() -> int:
        return int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: any generator takes it

    g = noise or torch.Generator(device=device).manual_seed(fresh())
    sampler_seed = fresh() if noise is None else derived_seed(f"poisson-sampler:{g.initial_seed()}", 0)
    return g, torch.Generator().manual_seed(sampler_seed)


def dp_round(
    model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig, context: Context,
    how: Feed = PLAIN,
) -> tuple[TrainResult, dict[str, float | int]]:
    """A client's DP-SGD round: restore its state, check its budget and its node's cap and record the round
    (``reserve_round``), train, keep the new state.

    Raises
    ------
    BudgetSpentError
        If the round would exceed ``privacy.budget``; nothing is trained.
    """
    state = load_state(context) or initial_state(cfg, len(data))
    reserve_round(state, plan, cfg.privacy, context)
    result, state = train_private(model, data, plan, cfg, state, how=how)
    save_state(context, state)
    return result, privacy_metrics(state, cfg.privacy)


def train_private(
    model: TransferModel, data: LabelledImages, plan: RoundPlan, cfg: ExperimentConfig, state: PrivacyState,
    *, noise_generator: torch.Generator | None = None, how: Feed = PLAIN,
) -> tuple[TrainResult, PrivacyState]:
    """One round of DP-SGD on ``data``, continuing the accountant of ``state``.

    Parameters
    ----------
    model : TransferModel
        Its trainable set must already be ``plan``'s; trained in place.
    data : LabelledImages
        The client's labelled images (the dataset Opacus samples from).
    plan : RoundPlan
        Units, learning rates, local epochs.
    cfg : ExperimentConfig
        ``finetune`` (batch size, momentum, weight decay) and ``privacy`` sections.
    state : PrivacyState
        The noise multiplier, sample rate and history so far.
    noise_generator : torch.Generator, optional
        Source of the noise, on the model's device (tests); see ``dp_generators``. Default: seeded
        from ``os.urandom``.
    how : Feed
        The feature cache and augmentation. Opacus samples item indices (Poisson) and wraps the part
        of the model above the cut: per-sample gradients are computed only there.

    Returns
    -------
    (TrainResult, PrivacyState)
        The round's training figures and the state with this round's steps added.
    """
    p, ft = cfg.privacy, cfg.finetune
    check_dp_trainable(model, model.trainable_units)
    if len(data) == 0:
        raise ValueError("this client holds no labelled images; nothing to train on")
    q, _ = poisson_schedule(len(data), ft.batch_size)
    if not math.isclose(q, state.sample_rate):
        raise DPConfigError(f"this client's data changed size during the run (sample rate {q} != {state.sample_rate})")
    g, sampler = dp_generators(model.device, noise_generator)
    opt = torch.optim.SGD(model.param_groups(plan.lrs), momentum=ft.momentum, weight_decay=ft.weight_decay)
    f = feed(model, data, how, train=True)
    # Poisson sampling over the items' positions; each batch's inputs are read (or looked up) after.
    loader = DataLoader(TensorDataset(torch.arange(len(data)), data.y), batch_size=ft.batch_size, generator=sampler)
    # lazily: ~1.5 s to import, unused by most processes
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=p.accountant)
    engine.accountant.history = list(state.history)
    model.train()
    module, optimizer, *criterion, dp_loader = engine.make_private(
        module=f.net, optimizer=opt, data_loader=loader, noise_multiplier=state.noise_multiplier,
        max_grad_norm=p.max_grad_norm, poisson_sampling=True, grad_sample_mode=p.grad_sample_mode,
        noise_generator=g, criterion=nn.CrossEntropyLoss(),
    )
    loss_fn = criterion[0] if criterion else nn.CrossEntropyLoss()  # ghost clipping returns its own criterion
    total, losses, steps = 0.0, 0, 0
    dev = model.device
    try:
        for _ in range(plan.local_epochs):
            for pos, y in dp_loader:
                optimizer.zero_grad(set_to_none=True)
                # An empty Poisson batch still steps: its noise is released (and accounted) all the same.
                x, y = f.inputs(pos.long(), dev), y.to(dev)
                loss = loss_fn(module(x), y)
                loss.backward()
                optimizer.step()
                if len(y):
                    total, losses = total + float(loss.detach()), losses + 1
                steps += 1
    finally:
        module._close()  # removes Opacus's hooks and per-sample gradients from ``model`` (or its suffix)
    new = PrivacyState(state.noise_multiplier, state.sample_rate, [tuple(h) for h in engine.accountant.history])
    return TrainResult(loss=total / max(losses, 1), examples=len(data), steps=steps), new
