"""The BatchNorm policy: a pre-trained backbone trains the function it is evaluated with; statistics that
move from scratch end at what the final weights give; the config records what a run does."""

from __future__ import annotations

import pytest
import torch

from fedtl.clients.trainer import train_local
from fedtl.config import ConfigError
from fedtl.data.federated import client_data, server_test_data
from fedtl.models.modes import plan_round
from fedtl.models.transfer import STATISTICS, BatchNormLayer, TransferModel
from fedtl.personalisation import run_model
from tests.helpers import make_config

LITE0 = ("model.backbone=efficientnet-lite0", "data.image-size=32")


def _norms(model: TransferModel) -> list[BatchNormLayer]:
    return [m for m in model.blocks.modules() if isinstance(m, BatchNormLayer)]


@pytest.mark.parametrize(("sets", "resolved"), [
    ((), "frozen"),  # pre-trained weights, every mode that trains blocks
    (("finetune.mode=full",), "frozen"),
    (("init=scratch",), "batch"),  # from random init: statistics from the batches
    (("finetune.mode=bn-only",), "batch"),  # BN-adapt's point
    (("strategy.personalisation=fedbn", "finetune.mode=full"), "local"),  # FedBN's point
    (("finetune.mode=full", "finetune.batchnorm=batch"), "batch"),  # a researcher's explicit choice stays
])
def test_auto_resolves_when_the_config_is_read_and_config_toml_records_it(sets: tuple[str, ...], resolved: str) -> None:
    cfg = make_config(*sets)
    assert cfg.finetune.batchnorm == resolved
    assert f'batchnorm = "{resolved}"' in cfg.to_toml()
    assert cfg.as_scratch().finetune.batchnorm == ("local" if "fedbn" in str(sets) else "batch")


def test_an_unknown_policy_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="finetune.batchnorm.*frozen"):
        make_config("finetune.batchnorm=fixed")


@pytest.mark.parametrize("mode", ["full", "discriminative", "gradual-unfreezing"])
def test_a_pretrained_batchnorm_backbone_trains_the_function_it_is_evaluated_with(mode: str) -> None:
    cfg = make_config(*LITE0, f"finetune.mode={mode}")
    model = run_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, 10)  # gradual unfreezing: several blocks by round 10
    plan.apply_to(model)
    model.train()
    assert not any(m.training for m in _norms(model)), "BatchNorm of a pre-trained backbone runs in eval mode"
    assert not any(k.endswith(STATISTICS) for k in model.travelling_keys()), "fixed statistics do not travel"

    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = client_data(cfg.data, 0, cfg.clients, cfg.seed)
    train_local(model, data, plan, cfg.finetune, seed=1)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(STATISTICS)]
    affine = [f"{name}.{t}" for name, m in model.named_modules() if isinstance(m, BatchNormLayer)
              and name.startswith(tuple(f"blocks.{b}." for b in plan.trainable_blocks)) for t in ("weight", "bias")]
    assert stats and affine
    assert all(torch.equal(before[k], after[k]) for k in stats), "running statistics moved"
    assert any(not torch.equal(before[k], after[k]) for k in affine), "γ/β did not train"

    x = data.batch(torch.arange(len(data)))
    model.train()
    with torch.no_grad():
        trained_fn = model(x)
    assert torch.allclose(trained_fn, model.predict(x), atol=1e-5), "train-mode output differs from eval mode"


def test_full_at_a_vanishing_backbone_rate_is_feature_extraction_on_a_small_batchnorm_backbone() -> None:
    """With the statistics frozen, `full` whose blocks barely move trains the head on the very features feature
    extraction does; with BatchNorm on batch statistics the head learned on other features (issue 27)."""
    heads, preds = [], []
    for mode in ("feature-extraction", "full"):
        cfg = make_config("model.backbone=small-cnn-bn", f"finetune.mode={mode}", "finetune.backbone-lr-scale=1e-6")
        model = run_model(cfg)
        plan = plan_round(cfg.finetune, model.block_names, 1)
        plan.apply_to(model)
        for rnd in range(3):
            for p in range(3):
                train_local(model, client_data(cfg.data, p, cfg.clients, cfg.seed), plan, cfg.finetune, seed=rnd * 10 + p)
        heads.append(model.head.weight.detach().clone())
        preds.append(model.predict(server_test_data(cfg.data).batch(torch.arange(200))).argmax(1))
    assert torch.allclose(heads[0], heads[1], atol=1e-4)
    assert (preds[0] == preds[1]).float().mean() >= 0.99


@pytest.mark.parametrize("policy", ["batch", "local"])
def test_statistics_that_move_end_at_the_batch_statistics_of_the_final_weights(policy: str) -> None:
    """From scratch (and FedBN), a round ends with each running statistic equal to the mean of what its batches
    gave under the weights training ended with, not a trail of the weights it passed through."""
    cfg = make_config("model.backbone=small-cnn-bn", "init=scratch", "finetune.mode=full", f"finetune.batchnorm={policy}")
    model = run_model(cfg)
    assert cfg.finetune.batchnorm == policy
    plan = plan_round(cfg.finetune, model.block_names, 1)
    plan.apply_to(model)
    model.train()
    assert all(m.training and m.momentum == 0.1 for m in _norms(model))
    statistics = model.statistics_keys()
    travelling = set(model.travelling_keys())
    assert (statistics <= travelling) if policy == "batch" else (statistics <= model.local_keys and
                                                                 not statistics & travelling)
    data = client_data(cfg.data, 0, cfg.clients, cfg.seed)  # 10 images: one batch of 16
    train_local(model, data, plan, cfg.finetune, seed=1)

    first = _norms(model)[0]  # nothing normalises before it: its input is the same in eval mode, which moves nothing
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    model.eval()
    with torch.no_grad():
        model(data.batch(torch.arange(len(data))))
    hook.remove()
    x = seen[0]
    mean = x.mean(dim=(0, 2, 3))
    assert torch.allclose(first.running_mean, mean, atol=1e-5)
    assert torch.allclose(first.running_var, x.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
