"""Sample-level DP on a client: DP-SGD with Opacus, accounted over the whole run.

Each round Opacus wraps the model afresh (the trainable set may change between rounds,
as under gradual unfreezing), but the accountant is restored from the client's
``PrivacyState`` (``fedtl.clients.spend``), so the epsilon reported is the client's total
spend so far. The round runs the same training loop as plain SGD
(``fedtl.clients.trainer.local_steps``) over Opacus's wrapped model, optimiser and Poisson loader.

Why the trainable set may change without breaking the accounting: a DP-SGD step
releases one noised sum of per-sample gradients clipped to ``max-grad-norm`` as a
whole vector, whatever parameters it spans; its privacy cost depends only on the noise
multiplier and the sample rate. Frozen blocks are public (pre-trained) and run in eval
mode, so no example influences them.

The noise comes from fresh operating-system entropy, never from the run's seed: the
server knows that seed and could regenerate (and subtract) seeded noise.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtl.accounting import poisson_schedule
from fedtl.clients.spend import (
    NodeState,
    PrivacyState,
    initial_state,
    load_state,
    privacy_metrics,
    reserve_round,
    save_state,
)
from fedtl.clients.trainer import TrainResult, local_steps
from fedtl.config import FinetuneConfig, PrivacyConfig
from fedtl.data.rows import LabelledImages
from fedtl.errors import DPConfigError
from fedtl.models.features import PLAIN, Feed, feeder
from fedtl.models.transfer import TransferModel
from fedtl.privacy import check_dp_trainable
from fedtl.protocol import RoundPlan
from fedtl.seeds import derived_seed


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
    model: TransferModel, data: LabelledImages, plan: RoundPlan, ft: FinetuneConfig, p: PrivacyConfig, *,
    rounds: int, node: NodeState, feed: Feed = PLAIN,
) -> tuple[TrainResult, dict[str, float | int]]:
    """A client's DP-SGD round: restore its state from ``node`` (or start one, calibrated over the run's planned
    ``rounds``), check its budget and its node's cap and record the round (``reserve_round``), train, keep the
    new state.

    Raises
    ------
    BudgetSpentError
        If the round would exceed ``privacy.budget`` or the node's cap; nothing is trained.
    """
    state = load_state(node) or initial_state(p, ft, rounds, len(data))
    reserve_round(state, plan, p, node)
    result, state = train_private(model, data, plan, ft, p, state, feed=feed)
    save_state(node, state)
    return result, privacy_metrics(state, p)


def train_private(
    model: TransferModel, data: LabelledImages, plan: RoundPlan, ft: FinetuneConfig, p: PrivacyConfig,
    state: PrivacyState, *, noise_generator: torch.Generator | None = None, feed: Feed = PLAIN,
) -> tuple[TrainResult, PrivacyState]:
    """One round of DP-SGD on ``data``, continuing the accountant of ``state``.

    Parameters
    ----------
    model : TransferModel
        Its trainable set must already be ``plan``'s; trained in place.
    data : LabelledImages
        The client's labelled images (the dataset Opacus samples from).
    plan : RoundPlan
        Units, learning rates, local epochs (FedProx's ``proximal_mu`` is not applied under DP-SGD).
    ft : FinetuneConfig
        Batch size, momentum and weight decay.
    p : PrivacyConfig
        Clipping norm, per-sample gradient engine and accountant.
    state : PrivacyState
        The noise multiplier, sample rate and history so far.
    noise_generator : torch.Generator, optional
        Source of the noise, on the model's device (tests); see ``dp_generators``. Default: seeded
        from ``os.urandom``.
    feed : Feed
        The feature cache and augmentation. Opacus samples item indices (Poisson) and wraps the part
        of the model above the cut: per-sample gradients are computed only there.

    Returns
    -------
    (TrainResult, PrivacyState)
        The round's training figures (the loss averaged over non-empty batches) and the state with this
        round's steps added.
    """
    check_dp_trainable(model, model.trainable_units)
    if len(data) == 0:
        raise ValueError("this client holds no labelled images; nothing to train on")
    q, _ = poisson_schedule(len(data), ft.batch_size)
    if not math.isclose(q, state.sample_rate):
        raise DPConfigError(f"this client's data changed size during the run (sample rate {q} != {state.sample_rate})")
    g, sampler = dp_generators(model.device, noise_generator)
    opt = torch.optim.SGD(model.param_groups(plan.lrs), momentum=ft.momentum, weight_decay=ft.weight_decay)
    f = feeder(model, data, feed, train=True)
    # Poisson sampling over the items' positions; each batch's inputs are read (or looked up) after.
    loader = DataLoader(TensorDataset(torch.arange(len(data)), data.y), batch_size=ft.batch_size, generator=sampler)
    # lazily: ~1.5 s to import, unused by most processes
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=p.accountant)
    # The accountant continues the client's spend so far (Opacus refuses a history under another mechanism).
    engine.accountant.load_state_dict({"history": list(state.history), "mechanism": p.accountant})
    model.train()
    module, optimizer, *criterion, dp_loader = engine.make_private(
        module=f.net, optimizer=opt, data_loader=loader, noise_multiplier=state.noise_multiplier,
        max_grad_norm=p.max_grad_norm, poisson_sampling=True, grad_sample_mode=p.grad_sample_mode,
        noise_generator=g, criterion=nn.CrossEntropyLoss(),
    )
    loss_fn = criterion[0] if criterion else nn.CrossEntropyLoss()  # ghost clipping returns its own criterion
    try:
        loss, steps = local_steps(dataclasses.replace(f, net=module), (dp_loader for _ in range(plan.local_epochs)),
                                  optimizer, loss_fn, model.device)
    finally:
        module.to_standard_module()  # Opacus lets go of ``model``: its hooks and per-sample gradients removed
    history = engine.accountant.state_dict()["history"]
    new = PrivacyState(state.noise_multiplier, state.sample_rate, [tuple(h) for h in history])
    return TrainResult(loss=loss, examples=len(data), steps=steps), new
