"""Local fine-tuning of a TransferModel on one client's labelled images."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtl.config import FinetuneConfig
from fedtl.data.rows import LabelledImages
from fedtl.models.features import PLAIN, Feed, feed
from fedtl.models.transfer import BatchNormLayer, TransferModel
from fedtl.protocol import RoundPlan


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training reports."""

    loss: float
    examples: int
    steps: int


def train_local(
    model: TransferModel, data: LabelledImages, plan: RoundPlan, ft: FinetuneConfig, *, seed: int,
    how: Feed = PLAIN,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``data`` following ``plan``.

    Parameters
    ----------
    model : TransferModel
        Its trainable set must already be ``plan``'s (``set_trainable``); it trains on its own device.
    data : LabelledImages
        The client's labelled images.
    plan : RoundPlan
        Units to train, their learning rates, the number of local epochs and FedProx's ``proximal_mu``.
    ft : FinetuneConfig
        Batch size, momentum and weight decay.
    seed : int
        Seed of the batch order and of the augmentation (vary it per round and client).
    how : Feed
        The run's feature cache and augmentation (default: neither). Batches are read from the
        data's rows as they are needed, or (cache) its frozen prefix's features.

    Returns
    -------
    TrainResult
        Mean training loss over all steps, examples seen per epoch, optimiser steps.
    """
    if len(data) == 0:
        raise ValueError("this client holds no labelled images; nothing to train on")
    groups = model.param_groups(plan.lrs)
    opt = torch.optim.SGD(groups, momentum=ft.momentum, weight_decay=ft.weight_decay)
    # FedProx: (mu / 2) ||w - w_global||^2 keeps the local model near the received one.
    anchor = [(p, p.detach().clone()) for group in groups for p in group["params"]] if plan.proximal_mu else []
    g = torch.Generator().manual_seed(seed)
    f = feed(model, data, how, train=True)
    dev = model.device
    y = data.y.to(dev)
    model.train()
    total, steps = 0.0, 0
    with torch.random.fork_rng(devices=[]):  # the augmentation draws from torch's generator: seeded per round
        torch.manual_seed(seed)
        for _ in range(plan.local_epochs):
            for idx in torch.randperm(len(data), generator=g).split(ft.batch_size):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(f.net(f.inputs(idx, dev)), y[idx.to(dev)])
                if anchor:
                    loss = loss + plan.proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in anchor)
                loss.backward()
                opt.step()
                total += loss.detach().item()
                steps += 1
        recalibrate_statistics(model, (f.net(f.inputs(idx, dev)) for idx in torch.arange(len(data)).split(ft.batch_size)))
    return TrainResult(loss=total / steps, examples=len(data), steps=steps)


@torch.no_grad()
def recalibrate_statistics(model: TransferModel, passes: Iterable[torch.Tensor]) -> None:
    """Set the running statistics of every BatchNorm that moves to the exact mean of its batch statistics
    under the weights training ended with (``passes``: the forward passes, in train mode, run lazily here).

    Why: running statistics that trail a few dozen steps of fast-changing weights (a network from random
    init) describe no weights the model ever had, so the model evaluated is far from the one trained
    (small-cnn-bn from scratch, ten rounds: 0.24 in eval mode against 0.58 on batch statistics). torch's
    ``swa_utils.update_bn`` does this for a DataLoader; fedtl's batches come from its own feed.
    """
    moving = [m for m in model.modules() if isinstance(m, BatchNormLayer) and m.training and m.track_running_stats]
    if not moving:
        return
    kept = [m.momentum for m in moving]
    for m in moving:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over this pass's batches
    try:
        for _ in passes:
            pass
    finally:
        for m, momentum in zip(moving, kept):
            m.momentum = momentum
