"""Backbones, TransferModel and the registry."""

from __future__ import annotations

import pytest
import torch

from fedtl.models.backbones import BACKBONES, build_backbone
from fedtl.models.transfer import HEAD, TransferModel, state_fingerprint
from fedtl.registry import Registry, RegistryError

# Image backbones, with the small input each registry entry names (enough for every stride of the family).
SHAPES = {n: BACKBONES.get(n).test_input for n in BACKBONES.names() if len(BACKBONES.get(n).test_input) == 3}


def test_every_registered_backbone_is_tested_here_or_with_text() -> None:
    assert {"small-cnn", "small-cnn-bn", "resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
            "efficientnet_b0", "efficientnet-lite0", "convnext_tiny", "vit_b_16"} <= set(SHAPES)
    text = set(BACKBONES.names()) - set(SHAPES)
    assert text == {"hf-text", "minilm"}  # token ids: tests/unit/test_text.py runs them
    assert all(BACKBONES.get(n).test_input == (8,) for n in text)
    assert BACKBONES.get("minilm").ships_weights and not BACKBONES.get("small-cnn").ships_weights
    assert BACKBONES.get("hf-text").needs_path and BACKBONES.get("small-cnn").normalisation is None
    mean, std = BACKBONES.get("resnet18").normalisation("IMAGENET1K_V1")
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_blocks_cover_every_parameter_exactly_once_and_run(name: str) -> None:
    torch.manual_seed(0)
    shape = SHAPES[name]
    model = TransferModel(build_backbone(name, shape[0], image_size=shape[1]), num_classes=7)
    per_unit = [id(p) for u in model.units for p in model.unit(u).parameters()]
    assert len(per_unit) == len(set(per_unit))
    assert set(per_unit) == {id(p) for p in model.parameters()}
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_torchvision_backbone_adapts_to_grey_images() -> None:
    model = TransferModel(build_backbone("resnet18", 1), num_classes=3)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.fixture
def model() -> TransferModel:
    torch.manual_seed(0)
    return TransferModel(build_backbone("small-cnn", 1), num_classes=10)


def test_block_order_and_units(model: TransferModel) -> None:
    assert model.block_names == ("conv1", "conv2", "conv3")
    assert model.units == ("conv1", "conv2", "conv3", HEAD)


def test_set_trainable_freezes_the_rest_and_keeps_it_in_eval(model: TransferModel) -> None:
    model.set_trainable(["conv3"])
    assert model.trainable_units == ("conv3", HEAD)
    assert all(p.requires_grad for p in model.blocks["conv3"].parameters())
    assert not any(p.requires_grad for b in ("conv1", "conv2") for p in model.blocks[b].parameters())
    model.train()
    assert model.blocks["conv3"].training and model.head.training
    assert not model.blocks["conv1"].training and not model.blocks["conv2"].training
    model.set_trainable([], head=False)
    assert model.trainable_units == () and not any(p.requires_grad for p in model.parameters())
    with pytest.raises(KeyError, match="unknown blocks \\['conv9'\\]"):
        model.set_trainable(["conv9"])


def test_travelling_keys_are_exactly_the_trainable_units(model: TransferModel) -> None:
    model.set_trainable([])
    assert model.travelling_keys() == ["head.weight", "head.bias"]
    model.set_trainable(["conv3"])
    keys = model.travelling_keys()
    assert keys[:-2] == [k for k in model.state_dict() if k.startswith("blocks.conv3.")]
    assert set(model.travelling_state()) == set(keys)


def test_load_travelling_state_refuses_other_keys(model: TransferModel) -> None:
    model.set_trainable([])
    state = {k: torch.zeros_like(v) for k, v in model.travelling_state().items()}
    model.load_travelling_state(state)
    assert float(model.head.weight.detach().abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"missing \['head.bias'\]"):
        model.load_travelling_state({"head.weight": state["head.weight"]})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.conv1.0.bias'\]"):
        model.load_travelling_state({**state, "blocks.conv1.0.bias": torch.zeros(16)})


def test_bn_step_counter_does_not_travel() -> None:
    model = TransferModel(build_backbone("resnet18", 3), num_classes=2)
    model.set_trainable(["layer4"])
    keys = model.travelling_keys()
    assert any(k.endswith("running_mean") for k in keys)
    assert not any(k.endswith("num_batches_tracked") for k in keys)


def test_param_groups_one_per_trainable_unit(model: TransferModel) -> None:
    model.set_trainable(["conv2", "conv3"])
    groups = model.param_groups({"conv2": 0.01, "conv3": 0.02, HEAD: 0.1, "conv1": 9.0})
    assert [(g["name"], g["lr"]) for g in groups] == [("conv2", 0.01), ("conv3", 0.02), (HEAD, 0.1)]
    assert sum(len(g["params"]) for g in groups) == 4 + 4 + 2  # conv w,b + GroupNorm w,b per block; head w,b
    with pytest.raises(KeyError, match="no learning rate for trainable units \\['conv2'\\]"):
        model.param_groups({"conv3": 0.02, HEAD: 0.1})


def test_fingerprint_is_stable_and_sensitive() -> None:
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    assert state_fingerprint(a) == state_fingerprint({"b": torch.ones(2), "w": torch.arange(6.0).reshape(2, 3)})
    changed = {**a, "b": torch.tensor([1.0, 1.0 + 1e-6])}
    assert state_fingerprint(changed) != state_fingerprint(a)
    assert state_fingerprint({"w": a["w"].reshape(3, 2), "b": a["b"]}) != state_fingerprint(a)


def test_registry_rejects_duplicates_and_explains_unknown_names() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("alpha")(1)
    with pytest.raises(RegistryError, match="thing 'alpha' is registered twice"):
        reg.register("alpha")(2)
    with pytest.raises(RegistryError, match="unknown thing 'alpah'. Did you mean 'alpha'"):
        reg.get("alpah")
