"""The frozen-prefix feature cache is exact: bit for bit the same updates, losses and predictions as without it
(on the CPU, where the prefix computed in batches of 256 gives the same numbers as in batches of 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtl.clients.dp_sgd import train_private
from fedtl.clients.spend import initial_state
from fedtl.clients.trainer import train_local
from fedtl.config import DataConfig, FinetuneConfig
from fedtl.data.federated import LabelledImages, client_data, server_test_data
from fedtl.models.adapters import adapt
from fedtl.models.backbones import build_backbone
from fedtl.models.features import FORWARD_BYTES, MAX_FORWARD, PLAIN, Feed, feeder, forward_batch, frozen_prefix, predict
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from tests.helpers import make_config

FT = FinetuneConfig(lr=0.1, batch_size=4, local_epochs=3)
DATA = DataConfig(labelled_per_client=12)


def _model(adapter: str | None = None) -> TransferModel:
    torch.manual_seed(0)
    model = TransferModel(build_backbone("small-cnn", 1), 10)
    model.backbone_fingerprint = "test-small-cnn-seed-0"
    if adapter is not None:
        adapt(model, adapter, ("conv3",), FinetuneConfig(mode=adapter), seed=0)
    return model


PLANS = {
    "feature-extraction": (None, RoundPlan({"head": 0.1}, 3)),
    "top-block": (None, RoundPlan({"conv3": 0.01, "head": 0.1}, 3)),
    "lora-top-block": ("lora", RoundPlan({"conv3": 0.1, "head": 0.1}, 3)),
    "bn-only-top-block": ("bn-only", RoundPlan({"conv3": 0.1, "head": 0.1}, 3)),
}


def _trained(adapter: str | None, plan: RoundPlan, feed: Feed) -> tuple[dict[str, torch.Tensor], float, torch.Tensor]:
    model = _model(adapter)
    plan.apply_to(model)
    data = client_data(DATA, 0, 10, seed=0)  # in its domain style: every item drawn from its own seed
    result = train_local(model, data, plan, FT, seed=5, feed=feed)
    return model.travelling_state(), result.loss, predict(model, server_test_data(DATA), feed)


@pytest.mark.parametrize("name", list(PLANS))
def test_training_on_cached_features_gives_the_same_update(name: str, tmp_path: Path) -> None:
    adapter, plan = PLANS[name]
    feed = Feed(cache_dir=str(tmp_path))
    off, loss_off, logits_off = _trained(adapter, plan, PLAIN)
    on, loss_on, logits_on = _trained(adapter, plan, feed)
    again, loss_again, _ = _trained(adapter, plan, feed)  # from the cache on disk, as a later round would
    assert list(tmp_path.iterdir()), "nothing was cached"
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=0, atol=0, msg=f"{key} differs with the cache")
        assert torch.equal(on[key], again[key])
    assert loss_on == loss_off and loss_again == loss_on
    torch.testing.assert_close(logits_on, logits_off, rtol=0, atol=0)


def test_the_cut_is_below_the_lowest_trainable_block() -> None:
    model = _model()
    RoundPlan({"head": 0.1}, 1).apply_to(model)
    assert frozen_prefix(model) == len(model.block_names)
    RoundPlan({"conv2": 0.1, "conv3": 0.1, "head": 0.1}, 1).apply_to(model)
    assert frozen_prefix(model) == model.block_names.index("conv2")
    RoundPlan({b: 0.1 for b in model.block_names} | {"head": 0.1}, 1).apply_to(model)
    f = feeder(model, client_data(DATA, 0, 10, seed=0), Feed(cache_dir="/nonexistent"))
    assert (f.cut, f.cached, f.net) == (0, False, model)  # everything trains: nothing to cache


def test_augmentation_turns_the_cache_off_for_training_only(tmp_path: Path) -> None:
    model = _model()
    RoundPlan({"head": 0.1}, 1).apply_to(model)
    data = client_data(DATA, 0, 10, seed=0)
    feed = Feed(cache_dir=str(tmp_path), augment="crop-flip")
    assert not feeder(model, data, feed, train=True).cached  # a random crop acts below every cut
    assert feeder(model, data, feed).cached  # evaluation is never augmented


def test_a_lower_cut_starts_from_the_nearest_cached_one(tmp_path: Path) -> None:
    # Gradual unfreezing: the head first, then conv3 too; conv3's input is the cut below the cached one.
    model = _model()
    data = client_data(DATA, 0, 10, seed=0)
    feed = Feed(cache_dir=str(tmp_path))
    RoundPlan({"conv2": 0.1, "conv3": 0.1, "head": 0.1}, 1).apply_to(model)
    low = predict(model, data, feed)  # caches the cut below conv2
    RoundPlan({"conv3": 0.1, "head": 0.1}, 1).apply_to(model)
    high = predict(model, data, feed)  # the cut below conv3: from the cached one below conv2
    metas = [json.loads(p.read_text()) for p in tmp_path.glob("*/meta.json")]
    assert sorted((m["parts"]["cut"], m["info"]["from-cut"]) for m in metas) == [(1, 0), (2, 1)]
    torch.testing.assert_close(high, low, rtol=0, atol=0)
    torch.testing.assert_close(high, predict(model, data), rtol=0, atol=0)


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_dp_sgd_on_cached_features_is_the_same_dp_sgd(adapter: str | None, tmp_path: Path) -> None:
    cfg = make_config("privacy.mode='dp-sgd'", "privacy.noise-multiplier=1.0", "finetune.batch-size=4")
    plan = RoundPlan({"conv3": 0.1, "head": 0.1} if adapter else {"head": 0.1}, 2)
    data = client_data(DATA, 0, 10, seed=0)
    runs = []
    for feed in (PLAIN, Feed(cache_dir=str(tmp_path))):
        model = _model(adapter)
        plan.apply_to(model)
        noise = torch.Generator().manual_seed(11)  # the same noise and Poisson draws in both runs
        state = initial_state(cfg.privacy, cfg.finetune, cfg.rounds, len(data))
        result, _ = train_private(model, data, plan, cfg.finetune, cfg.privacy, state, noise_generator=noise, feed=feed)
        runs.append((model.travelling_state(), result.steps))
    (off, steps_off), (on, steps_on) = runs
    assert steps_on == steps_off
    for key in off:
        torch.testing.assert_close(on[key], off[key], rtol=0, atol=0, msg=f"{key} differs with the cache")


def test_eval_forward_passes_are_sized_by_their_input() -> None:
    # 256 images of 224 px per forward pass took over a GB of activations per process; a batch's input is
    # now kept near FORWARD_BYTES, and small inputs still go MAX_FORWARD at a time.
    big = LabelledImages(torch.zeros(40, 3, 224, 224, dtype=torch.uint8), torch.zeros(40, dtype=torch.long),
                         ("clean",) * 40)
    small = LabelledImages(torch.zeros(40, 1, 16, 16), torch.zeros(40, dtype=torch.long), ("clean",) * 40)
    assert forward_batch(big) == FORWARD_BYTES // (4 * 3 * 224 * 224) == 27
    assert forward_batch(small) == MAX_FORWARD
