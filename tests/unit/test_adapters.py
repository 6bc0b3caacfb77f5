"""Adapter modes: peft LoRA, FFA-LoRA, BN-only and bias-only on the built-in CNN and resnet18."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtl.clients.trainer import train_local
from fedtl.config import ConfigError, FinetuneConfig
from fedtl.data.federated import LabelledImages
from fedtl.models.adapters import adapt
from fedtl.models.backbones import build_backbone
from fedtl.models.factory import build_model
from fedtl.models.modes import MODES, adapter_blocks, plan_round
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from tests.helpers import make_config


def _images(channels: int, size: int, n: int = 12, seed: int = 0) -> LabelledImages:
    g = torch.Generator().manual_seed(seed)
    return LabelledImages(torch.randn(n, channels, size, size, generator=g), torch.randint(0, 3, (n,), generator=g),
                          ("clean",) * n)


def _adapted(backbone: str, mode: str, channels: int = 3, **ft: object) -> tuple[TransferModel, RoundPlan]:
    torch.manual_seed(0)
    model = TransferModel(build_backbone(backbone, channels), 3)
    cfg = FinetuneConfig(mode=mode, lr=0.1, local_epochs=2, batch_size=4, **ft)
    if MODES.get(mode).adapter is not None:
        adapt(model, MODES.get(mode).adapter, adapter_blocks(model.block_names, cfg), cfg, seed=7)
    lrs = MODES.get(mode)(model.block_names, 1, cfg)
    plan = RoundPlan(lrs, cfg.local_epochs)
    plan.apply_to(model)
    return model, plan


@pytest.mark.parametrize(("backbone", "size"), [("small-cnn", 16), ("resnet18", 32)])
def test_lora_trains_only_adapters_and_head_and_leaves_the_base_bit_identical(backbone: str, size: int) -> None:
    model, plan = _adapted(backbone, "lora", adapter_blocks=2)
    top2 = model.block_names[-2:]
    travelling = model.travelling_keys()
    assert travelling and all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in travelling)
    assert {k.split(".")[1] for k in travelling if k.startswith("blocks.")} == set(top2)  # the top 2 blocks only
    x = torch.randn(2, 3, size, size)
    before = model.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    with torch.no_grad():  # B starts at zero: the adapted model computes what the base does
        model.eval()
        model.load_some({k: torch.zeros_like(v) for k, v in before.items() if ".lora_A." in k})
        base_out = model(x)
        model.load_some(before)
        assert torch.allclose(model(x), base_out)
    train_local(model, _images(3, size), plan, FinetuneConfig(lr=0.1, batch_size=4, local_epochs=2), seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(travelling)  # base weights and BatchNorm statistics bit-identical
    assert any(".lora_B." in k for k in changed) and any(".lora_A." in k for k in changed)


def test_ffa_lora_never_changes_a_and_sends_only_b() -> None:
    model, plan = _adapted("small-cnn", "ffa-lora")
    assert {k for k in model.travelling_keys() if k.startswith("blocks.")} == \
        {k for k in model.state_dict() if ".lora_B." in k}
    a_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_A." in k}
    assert len(a_before) == 3  # one adapted Conv2d per stage
    train_local(model, _images(3, 16), plan, FinetuneConfig(lr=0.1, batch_size=4), seed=0)
    after = model.state_dict()
    assert all(torch.equal(a_before[k], after[k]) for k in a_before)
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if ".lora_B." in k)


def test_adapters_are_seeded_so_every_process_builds_the_same_model() -> None:
    cfg = make_config("finetune.mode=ffa-lora")
    a, b = build_model(cfg), build_model(cfg)
    assert a.backbone_fingerprint == b.backbone_fingerprint
    assert build_model(cfg.replace(seed=1)).backbone_fingerprint != a.backbone_fingerprint  # A differs by seed


def test_bn_only_trains_norm_terms_and_statistics_bias_only_trains_biases() -> None:
    model, plan = _adapted("resnet18", "bn-only")
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert set(model.travelling_keys()) == {f"{n}.{s}" for n in norms for s in
                                           ("weight", "bias", "running_mean", "running_var")} | {"head.weight", "head.bias"}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    train_local(model, _images(3, 32), plan, FinetuneConfig(lr=0.1, batch_size=4), seed=0)
    assert any(not torch.equal(stats[k], model.state_dict()[k]) for k in stats)  # BN-only: statistics move

    model, plan = _adapted("small-cnn", "bias-only", adapter_blocks=1)
    assert model.travelling_keys() == ["blocks.conv3.0.bias", "blocks.conv3.1.bias", "head.weight", "head.bias"]
    assert [k for k, p in model.named_parameters() if p.requires_grad] == model.travelling_keys()


def test_lora_keeps_frozen_batchnorm_statistics_still_in_train_mode() -> None:
    model, _ = _adapted("resnet18", "lora", adapter_blocks=1)
    model.train()
    bns = [m for n, m in model.named_modules() if n.startswith("blocks.layer4") and isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.head.training


def test_size_reports_travelling_against_the_whole_model() -> None:
    model, _ = _adapted("small-cnn", "feature-extraction")
    size = model.size()
    # Built-in CNN, 3 channels: convs 3*16*9+16, 16*32*9+32, 32*64*9+64; norms 2*(16+32+64); head 256*3+3.
    body = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + 2 * (16 + 32 + 64)
    assert size == {"travelling_params": 771, "travelling_bytes": 771 * 4, "model_params": body + 771,
                    "model_bytes": (body + 771) * 4}
    lora, _ = _adapted("small-cnn", "lora", lora_rank=2)
    # Adapters do not count in the model (merged, they add nothing) but travel: conv3 A is 2x32x3x3, B 64x2x1x1.
    assert lora.size()["model_params"] == body + 771
    assert lora.size()["travelling_params"] == 771 + sum(2 * c_in * 9 + c_out * 2 for c_in, c_out in
                                                          ((3, 16), (16, 32), (32, 64)))


def test_adapter_errors_name_the_fix() -> None:
    model = TransferModel(build_backbone("small-cnn", 1), 3)
    model.blocks["conv3"] = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    with pytest.raises(ConfigError, match="LoRA found no Conv2d or Linear layer in blocks \\['conv3'\\].*adapter-blocks"):
        adapt(model, "lora", ["conv3"], FinetuneConfig(), seed=0)
    with pytest.raises(ConfigError, match="bn-only.*no normalisation layer"):
        adapt(model, "bn-only", ["conv3"], FinetuneConfig(), seed=0)


def test_adapter_plans_train_the_top_blocks_at_the_heads_rate() -> None:
    cfg = make_config("finetune.mode=lora", "finetune.adapter-blocks=2", "finetune.lr=0.2")
    assert plan_round(cfg.finetune, ["conv1", "conv2", "conv3"], 1).lrs == {"conv2": 0.2, "conv3": 0.2, "head": 0.2}
    every = make_config("finetune.mode=lora")  # adapter-blocks = 0: every block
    assert plan_round(every.finetune, ["a", "b", "c"], 5).trainable_blocks == ("a", "b", "c")


def test_inventory_by_hand_for_the_built_in_cnn() -> None:
    from fedtl.models.inventory import inventory

    (row,) = inventory(["small-cnn"], image_size=16)
    head = 256 * 10 + 10
    convs, norms = [3 * 16 * 9 + 16, 16 * 32 * 9 + 32, 32 * 64 * 9 + 64], [2 * 16, 2 * 32, 2 * 64]
    lora = sum(4 * c_in * 9 + c_out * 4 for c_in, c_out in ((3, 16), (16, 32), (32, 64)))  # A: r x c_in x 3 x 3, B: c_out x r
    assert row == {"backbone": "small-cnn", "blocks": ["conv1", "conv2", "conv3"], "params": sum(convs + norms) + head,
                   "feature-extraction": head, "gradual-unfreezing": convs[2] + norms[2] + head,
                   "full": sum(convs + norms) + head, "lora": lora + head, "bn-only": sum(norms) + head,
                   "bias-only": 16 + 32 + 64 + sum(norms) // 2 + head}


def test_lora_on_vit_reaches_every_adapter_and_skips_attentions_out_proj() -> None:
    torch.manual_seed(0)
    model = TransferModel(build_backbone("vit_b_16", 3, image_size=32), 3)
    ft = FinetuneConfig(mode="lora", lora_rank=2)
    adapt(model, "lora", ["embed", "layer11"], ft, seed=0)
    assert not any("out_proj" in k for k in model.adapter_keys)  # MultiheadAttention never calls it
    assert any(k.startswith("blocks.embed.conv_proj.lora_") for k in model.adapter_keys)
    RoundPlan({"embed": 0.1, "layer11": 0.1, "head": 0.1}, 1).apply_to(model)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at zero, so only B's gradient is non-zero at first
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_text_data_set_needs_a_text_backbone(tmp_path) -> None:
    from fedtl.config import ConfigError
    from tests.unit.test_text import write_reviews, write_tiny_bert

    write_tiny_bert(tmp_path / "bert")
    cfg = make_config("data.scenario=text", f"data.path={str(write_reviews(tmp_path / 'r.csv'))!r}",
                      f"data.tokenizer={str(tmp_path / 'bert')!r}", "init=scratch")
    with pytest.raises(ConfigError, match="'small-cnn' takes image, but data.scenario = 'text' gives token ids"):
        build_model(cfg)
