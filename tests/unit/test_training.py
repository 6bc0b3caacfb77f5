"""Local training: what is frozen never changes; what trains does."""

from __future__ import annotations

import pytest
import torch

from fedtl.batchnorm import BATCHNORM
from fedtl.clients.trainer import train_local
from fedtl.config import DataConfig, FinetuneConfig
from fedtl.data.federated import LabelledImages, client_data
from fedtl.models.backbones import build_backbone
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
