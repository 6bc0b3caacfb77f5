"""Outside weights: files saved by the test and torchvision's weights API over a local hub cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models as tvm

from fedtl.config import ConfigError
from fedtl.errors import WeightsError
from fedtl.models.backbones import BACKBONES
from fedtl.models.factory import build_model, outside_backbone
from fedtl.models.transfer import TransferModel
from fedtl.models.weights import published
from tests.helpers import make_config

TORCHVISION = [n for n in BACKBONES.names() if BACKBONES.get(n).build.__module__.endswith("torchvision_backbones")]


def _digests(tensors) -> list[str]:
    return sorted(hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for t in tensors)


def _saved(name: str, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = tvm.get_model(name, weights=None).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_backbone_loads_a_state_dict_saved_by_the_test(name: str, tmp_path: Path) -> None:
    path = tmp_path / ("w.safetensors" if TORCHVISION.index(name) % 2 else "w.pth")
    state = _saved(name, path)
    cfg = make_config(f"model.backbone={name}", f"model.weights-path={str(path)!r}", "data.image-size=32")
    backbone = outside_backbone(cfg, in_channels=1)
    model = TransferModel(backbone, 3)
    # Every tensor of the file but its classifier is in the blocks (ViT: position embeddings
    # interpolated from 224 to 32 pixels), and nothing else is.
    assert backbone.head_prefixes[0] in {"fc.", "classifier.", "classifier.2.", "heads."}
    kept = [v for k, v in state.items() if not k.startswith(backbone.head_prefixes) and k != "encoder.pos_embedding"
            and not k.endswith("num_batches_tracked")]
    ours = [v for k, v in model.state_dict().items() if k.startswith("blocks.") and "pos_embedding" not in k
            and not k.endswith("num_batches_tracked")]
    assert _digests(ours) == _digests(kept)
    model.eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)  # grey images, repeated to RGB and normalised


def test_published_weights_load_through_torchvisions_api_from_the_hub_cache(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = published("resnet18", "IMAGENET1K_V1")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = _saved("resnet18", cache / Path(weights.url).name)  # where torch.hub looks before downloading
    backbone = outside_backbone(make_config("model.backbone=resnet18", "model.weights=DEFAULT"), in_channels=3)
    stem = backbone.blocks[0][1]
    assert torch.equal(stem[1][0].weight, state["conv1.weight"])
    assert torch.allclose(stem[0].mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))  # the weights' own transform


def test_published_weights_missing_offline_name_the_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # refused at once, as offline
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth is not in the torch hub cache.*weights-path"):
        outside_backbone(make_config("model.backbone=resnet18", "model.weights=IMAGENET1K_V1"), in_channels=3)


def test_a_state_dict_of_another_architecture_lists_what_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "r18.safetensors"
    _saved("resnet18", path)
    cfg = make_config("model.backbone=resnet50", f"model.weights-path={str(path)!r}")
    with pytest.raises(WeightsError, match=r"does not fit this backbone: \d+ missing .*layer1\.0\.conv3\.weight.*"
                                           r"unexpected.*of another shape.*same architecture"):
        outside_backbone(cfg, in_channels=3)


@pytest.mark.parametrize(("content", "message"), [
    (b"not a model at all", "cannot be read as a state dict"),
    (None, "holds a Tensor, not a state dict"),
])
def test_files_that_are_not_state_dicts_fail_cleanly(tmp_path: Path, content: bytes | None, message: str) -> None:
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        if content is None:
            if suffix == ".safetensors":
                continue
            torch.save(torch.zeros(3), path)
        else:
            path.write_bytes(content)
        with pytest.raises(WeightsError, match=message):
            outside_backbone(make_config("model.backbone=resnet18", f"model.weights-path={str(path)!r}"), 3)


def test_a_training_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    state = _saved("mobilenet_v3_small", tmp_path / "plain.pth")
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "ckpt.pth")
    cfg = make_config("model.backbone=mobilenet_v3_small", f"model.weights-path={str(tmp_path / 'ckpt.pth')!r}")
    backbone = outside_backbone(cfg, in_channels=3)
    assert torch.equal(backbone.blocks[0][1][1][0].weight, state["features.0.0.weight"])


def test_weights_config_errors() -> None:
    with pytest.raises(ConfigError, match="both name pre-trained weights: keep one"):
        make_config("model.weights=DEFAULT", "model.weights-path='w.pth'")
    with pytest.raises(WeightsError, match="publishes no weights for 'small-cnn'"):
        published("small-cnn", "DEFAULT")
    with pytest.raises(WeightsError, match="not one of resnet18's torchvision weights: IMAGENET1K_V1"):
        published("resnet18", "IMAGENET22K")
    with pytest.raises(WeightsError, match="does not exist"):
        outside_backbone(make_config("model.backbone=resnet18", "model.weights-path='/nope.pth'"), 3)


def test_the_architecture_without_its_weights_matches_for_checkpoints(tmp_path: Path) -> None:
    _saved("resnet18", tmp_path / "w.pth")
    cfg = make_config("model.backbone=resnet18", f"model.weights-path={str(tmp_path / 'w.pth')!r}")
    with_weights, bare = build_model(cfg), build_model(cfg, load_weights=False)
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in with_weights.state_dict().items()}
    bare.load_state_dict(with_weights.state_dict())  # what the report does with a run's last checkpoint


def test_a_runs_checkpoint_seeds_a_new_run_with_its_blocks_and_a_new_head(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedtl.reports.runs import to_json

    source = build_model(make_config())
    trained = {k: v + 0.25 if k.startswith("blocks.") else v for k, v in source.state_dict().items()}
    path = tmp_path / "last.safetensors"  # as RunRecorder.checkpoint writes it
    save_file({k: v.contiguous() for k, v in trained.items()}, str(path),
              metadata={"round": to_json(5), "accuracy": to_json(0.9), "backbone_fingerprint": to_json("f00d")})
    seeded = build_model(make_config(f"model.weights-path={str(path)!r}", "seed=3"))
    for key, value in seeded.state_dict().items():
        if key.startswith("blocks."):
            assert torch.equal(value, trained[key]), key
    assert not torch.equal(seeded.head.weight, trained["head.weight"])  # a new task's head, seeded
    assert seeded.backbone_fingerprint != source.backbone_fingerprint
    with pytest.raises(WeightsError, match="is a fedtl checkpoint of another model"):
        build_model(make_config(f"model.weights-path={str(path)!r}", "model.backbone=mobilenet_v3_small"))
