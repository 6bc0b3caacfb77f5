"""Local training: what is frozen never changes; what trains does; the one loop's counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedtl.batchnorm import BATCHNORM
from fedtl.clients.trainer import local_steps, train_local
from fedtl.config import DataConfig, FinetuneConfig
from fedtl.data.federated import LabelledImages, client_data
from fedtl.models.backbones import build_backbone
from fedtl.models.features import ModelFeed
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan

FT = FinetuneConfig(lr=0.1, batch_size=8)


def _snapshot(model: TransferModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("trainable", [(), ("conv3",), ("conv2", "conv3")])
def test_frozen_blocks_never_change_and_trainable_ones_do(trainable: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = TransferModel(build_backbone("small-cnn", 1), 10)
    model.set_trainable(trainable)
    before = _snapshot(model)
    data = client_data(DataConfig(), 0, 10, seed=0)
    plan = RoundPlan({**{b: 0.05 for b in trainable}, "head": 0.1}, local_epochs=2)
    result = train_local(model, data, plan, FT, seed=1)
    assert result.examples == len(data) and result.steps == 2 * -(-len(data) // 8)
    after = model.state_dict()
    travelling = set(model.travelling_keys())
    for key in before:
        if key in travelling:
            assert not torch.equal(before[key], after[key]), f"{key} did not train"
        else:
            assert torch.equal(before[key], after[key]), f"frozen {key} changed"


@pytest.mark.parametrize(("policy", "trainable_moves"), [("batch", True), ("local", True), ("frozen", False)])
def test_batchnorm_statistics_move_only_in_trainable_blocks_and_only_where_the_policy_moves_them(
        policy: str, trainable_moves: bool) -> None:
    torch.manual_seed(0)
    model = TransferModel(build_backbone("resnet18", 3), 4)
    model.set_batchnorm(BATCHNORM.get(policy))
    model.set_trainable(["layer4"])
    stem_bn, top_bn = model.blocks["stem"][1], model.blocks["layer4"][0][0].bn1
    stem_mean, top_mean = stem_bn.running_mean.clone(), top_bn.running_mean.clone()
    data = LabelledImages(torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,)), ("clean",) * 8)
    train_local(model, data, RoundPlan({"layer4": 0.01, "head": 0.1}, 1), FT, seed=0)
    assert torch.equal(stem_bn.running_mean, stem_mean)  # frozen block: eval mode, statistics fixed
    # trainable block: statistics follow the data from scratch (batch) and under FedBN (local), not when frozen
    assert torch.equal(top_bn.running_mean, top_mean) != trainable_moves


def test_the_loop_steps_on_an_empty_batch_but_leaves_it_out_of_the_mean_loss() -> None:
    # What DP-SGD needs of the loop it shares with SGD: an empty Poisson batch still steps (its noise is
    # released), yet has no loss to count. A zero-weight net gives logits 0: each example's loss is ln 2.
    net = torch.nn.Linear(1, 2, bias=False)
    torch.nn.init.zeros_(net.weight)
    f = ModelFeed(net, lambda pos, dev: torch.ones(len(pos), 1, device=dev), 0, False)
    taken = []

    class Counting(torch.optim.SGD):
        def step(self, closure: None = None) -> None:
            taken.append(1)
            super().step(closure)

    full, empty = (torch.tensor([0, 1]), torch.tensor([0, 1])), (torch.tensor([], dtype=torch.long),) * 2
    loss, steps = local_steps(f, [[full, empty], [empty, full]], Counting(net.parameters(), lr=0.0),
                              lambda out, y: F.cross_entropy(out, y, reduction="sum"), torch.device("cpu"),
                              penalty=lambda: torch.tensor(1.0))
    assert steps == len(taken) == 4
    assert loss == pytest.approx(2 * math.log(2) + 1)  # the two full batches only, each with its penalty
