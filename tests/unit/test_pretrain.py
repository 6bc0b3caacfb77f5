"""Pre-training: deterministic, cached by its config, and refused when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedtl.errors import WeightsError
from fedtl.models.factory import build_model
from fedtl.models.pretrain import ensure_pretrained, load_pretrained, pretrain, pretrained_path
from fedtl.models.transfer import state_fingerprint
from tests.helpers import make_config


def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    cfg = make_config("pretrain.epochs=1", f"pretrain.cache-dir={str(tmp_path)!r}")
    assert state_fingerprint(pretrain(cfg)) == state_fingerprint(pretrain(cfg))


def test_cache_is_keyed_by_what_the_weights_depend_on() -> None:
    cfg = make_config()
    assert pretrained_path(cfg) == pretrained_path(make_config("rounds=3", "finetune.mode=full", "seed=4"))
    assert pretrained_path(cfg) != pretrained_path(make_config("pretrain.epochs=3"))
    assert pretrained_path(cfg) != pretrained_path(make_config("data.image-size=12"))


def test_cached_weights_give_every_build_the_same_model(cache_dir: Path) -> None:
    cfg = make_config()
    path = ensure_pretrained(cfg)
    assert path.is_file() and path.parent == cache_dir
    a, b = build_model(cfg), build_model(cfg)
    assert a.backbone_fingerprint == b.backbone_fingerprint
    assert torch.equal(a.head.weight, b.head.weight)  # the seeded head is the same in every process
    scratch = build_model(cfg.as_scratch())
    assert scratch.backbone_fingerprint != a.backbone_fingerprint
    assert build_model(cfg.as_scratch()).backbone_fingerprint == scratch.backbone_fingerprint


def test_weights_that_do_not_fit_are_refused(tmp_path: Path, cache_dir: Path) -> None:
    model = build_model(make_config("init=scratch"))
    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.conv1.0.weight": torch.zeros(3, 3), "blocks.extra": torch.zeros(1)}, str(bad))
    with pytest.raises(WeightsError, match=r"do not fit this backbone: missing \['blocks.conv1.0.bias'.*unexpected "
                                         r"\['blocks.extra'\], wrong shape \['blocks.conv1.0.weight'\]"):
        load_pretrained(model, bad)


def test_new_head_starts_at_chance_not_where_pretraining_head_started() -> None:
    """Round 0 must measure an untrained head: about 1/10 on ten classes, not the source task."""
    from fedtl.data.federated import server_test_data
    from fedtl.models.metrics import central_evaluate

    cfg = make_config()
    accuracy = central_evaluate(build_model(cfg), server_test_data(cfg.data))["accuracy"]
    assert accuracy < 0.3


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_a_damaged_cache_file_is_pre_trained_again(tmp_path: Path, damage: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Before: a truncated file's SafetensorError reached the user as a traceback.
    cfg = make_config("pretrain.epochs=1", f"pretrain.cache-dir={str(tmp_path)!r}")
    path = ensure_pretrained(cfg)
    good = path.read_bytes()
    weights = state_fingerprint(load_file(str(path)))
    path.write_bytes(good[: len(good) // 2] if damage == "truncated" else good[:-1] + bytes([good[-1] ^ 1]))
    assert ensure_pretrained(cfg) == path
    assert "are damaged" in caplog.text
    assert state_fingerprint(load_file(str(path))) == weights  # deterministic: the same weights again
