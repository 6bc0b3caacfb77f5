"""DP-SGD on a client: accounting over the whole run, budgets, noise, what trains, BatchNorm."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant
from torch.nn.modules.batchnorm import _BatchNorm

from fedtl.accounting import sample_epsilon
from fedtl.clients.app import handle_train
from fedtl.clients.dp_sgd import train_private
from fedtl.clients.spend import NodeState, PrivacyState, initial_state, load_state, node_epsilon
from fedtl.clients.trainer import train_local
from fedtl.data.federated import LabelledImages, client_data
from fedtl.errors import DPConfigError
from fedtl.models.backbones import build_backbone
from fedtl.models.factory import build_model
from fedtl.models.modes import MODES, plan_round
from fedtl.models.transfer import TransferModel
from fedtl.privacy import check_dp_plans
from fedtl.protocol import RoundPlan
from tests.helpers import make_config, train_instruction

DP = ("privacy.mode=dp-sgd", "clients=5", "labelled-per-client=20", "finetune.batch-size=4", "local-epochs=2")


def _context(**node_config: object) -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": 2, "num-partitions": 5, **node_config},
                   state=RecordDict(), run_config={})


def _rounds(cfg, context: Context, rounds: range) -> list:
    fingerprint = build_model(cfg).backbone_fingerprint
    return [handle_train(train_instruction(cfg, fingerprint, rnd), context, cfg) for rnd in rounds]


def test_reported_epsilon_is_the_whole_runs_not_one_rounds(task_identity: None) -> None:
    cfg = make_config(*DP, "finetune.mode=gradual-unfreezing", "unfreeze-every=1")  # the trainable set grows each round
    replies = _rounds(cfg, _context(), range(1, 4))
    metrics = replies[-1].content["metrics"]
    # 20 examples in batches of 4: q = 0.2, 5 steps an epoch; 3 rounds x 2 epochs.
    assert metrics["privacy.sample-rate"] == 0.2 and metrics["privacy.steps"] == 30
    opacus = RDPAccountant()
    for _ in range(30):
        opacus.step(noise_multiplier=1.0, sample_rate=0.2)
    assert metrics["privacy.epsilon"] == pytest.approx(opacus.get_epsilon(1e-5), abs=1e-6)
    # The training loss is computed from the data without noise: under DP-SGD it does not leave the client
    # (three runs with fresh noise reported the same loss to five digits; one image fewer, another).
    assert "train-loss" not in metrics and "train-loss" in _rounds(make_config("clients=5"), _context(),
                                                                  range(1, 2))[0].content["metrics"]
    # What an engine made fresh each round would report instead: this test tells them apart.
    one_round = sample_epsilon([(1.0, 0.2, 10)], accountant="rdp", delta=1e-5)
    assert replies[0].content["metrics"]["privacy.epsilon"] == pytest.approx(one_round, abs=1e-9)
    assert metrics["privacy.epsilon"] > one_round + 1


def test_target_epsilon_calibrates_noise_for_every_planned_round(task_identity: None) -> None:
    cfg = make_config(*DP, "rounds=3", "target-epsilon=4")
    replies = _rounds(cfg, _context(), range(1, 4))
    final = replies[-1].content["metrics"]["privacy.epsilon"]
    assert 4 - 0.02 < final <= 4  # the whole plan lands on the target, not one round
    assert replies[0].content["metrics"]["privacy.epsilon"] < final / 1.3


def test_a_client_past_its_budget_declines_and_keeps_its_state(task_identity: None) -> None:
    after_1 = sample_epsilon([(1.0, 0.2, 10)], accountant="rdp", delta=1e-5)
    after_2 = sample_epsilon([(1.0, 0.2, 20)], accountant="rdp", delta=1e-5)
    cfg = make_config(*DP, f"max-epsilon={(after_1 + after_2) / 2}")
    context = _context()
    first, second = _rounds(cfg, context, range(1, 3))
    assert "arrays" in first.content.array_records
    assert "arrays" not in second.content.array_records
    assert "privacy budget spent" in second.content.config_records["declined"]["reason"]
    assert second.content["metrics"]["privacy.epsilon"] == pytest.approx(after_1)
    assert load_state(NodeState.of(context)).steps == 10  # nothing trained, nothing spent


def test_spend_survives_a_node_restart_through_its_state_dir(task_identity: None, tmp_path: Path) -> None:
    cfg = make_config(*DP)
    _rounds(cfg, _context(**{"state-dir": str(tmp_path)}), range(1, 2))
    assert (tmp_path / "run-7-privacy.json").is_file()
    restarted = _context(**{"state-dir": str(tmp_path)})  # empty context.state, same node and run
    (reply,) = _rounds(cfg, restarted, range(2, 3))
    assert reply.content["metrics"]["privacy.steps"] == 20


def test_a_node_caps_its_own_spend_over_every_run_whatever_the_server_asks(task_identity: None,
                                                                           tmp_path: Path) -> None:
    # 20 examples, batches of 4, 2 epochs: 10 steps a round at q = 0.2, sigma 1. The server sets no budget.
    # The node's figure is replace-one's (its count is published), at its own delta.
    one, two = (node_epsilon([(1.0, 0.2, n)], 1e-5) for n in (10, 20))
    assert two > sample_epsilon([(1.0, 0.2, 20)], accountant="rdp", delta=1e-5)
    cap = {"state-dir": str(tmp_path), "max-epsilon": (one + two) / 2}
    cfg = make_config(*DP)
    first = Context(run_id=1, node_id=1, node_config={"partition-id": 2, "num-partitions": 5, **cap},
                    state=RecordDict(), run_config={})
    trained, declined = _rounds(cfg, first, range(1, 3))
    assert "arrays" in trained.content and "declined" not in trained.content
    assert "this node's own privacy budget is spent" in declined.content["declined"]["reason"]
    assert "replace-one" in declined.content["declined"]["reason"]
    # Another run (another run id): the first one's spend counts, so it declines at once.
    later = Context(run_id=2, node_id=1, node_config={"partition-id": 2, "num-partitions": 5, **cap},
                    state=RecordDict(), run_config={})
    (again,) = _rounds(cfg, later, range(1, 2))
    assert "declined" in again.content and "over every run so far" in again.content["declined"]["reason"]
    # Without a state folder the cap cannot be kept: the node says so instead of training uncounted.
    with pytest.raises(DPConfigError, match="keeps no record of its spend.*state-dir"):
        _rounds(cfg, _context(**{"max-epsilon": 5.0}), range(1, 2))


def test_state_round_trips_through_a_config_record() -> None:
    state = PrivacyState(1.3, 0.25, [(1.3, 0.25, 40), (0.9, 0.25, 4)])
    assert PrivacyState.from_record(state.to_record()) == state


def _small(cfg) -> tuple[TransferModel, LabelledImages, RoundPlan]:
    model = build_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, 1)
    plan.apply_to(model)
    return model, client_data(cfg.data, 2, 5, cfg.seed), plan


def test_noise_is_really_added(task_identity: None) -> None:
    # q = 1: every batch holds every example, so sampling cannot tell two runs apart; only noise can.
    cfg = make_config(*DP, "finetune.batch-size=32")
    model, data, plan = _small(cfg)
    noisy, silent = initial_state(cfg.privacy, cfg.finetune, cfg.rounds, len(data)), PrivacyState(noise_multiplier=0.0, sample_rate=1.0)
    assert noisy.sample_rate == 1.0 and noisy.noise_multiplier == 1.0
    a, b, c, d = (copy.deepcopy(model) for _ in range(4))
    train_private(a, data, plan, cfg.finetune, cfg.privacy, noisy)
    train_private(b, data, plan, cfg.finetune, cfg.privacy, noisy)
    train_private(c, data, plan, cfg.finetune, cfg.privacy, silent)
    train_private(d, data, plan, cfg.finetune, cfg.privacy, silent)
    assert torch.equal(c.head.weight, d.head.weight)  # without noise, the same seedless run twice
    assert not torch.equal(a.head.weight, b.head.weight)  # fresh entropy each time, not the run's seed
    assert not torch.equal(a.head.weight, c.head.weight)


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
def test_without_noise_or_clipping_dp_sgd_is_plain_sgd(engine: str) -> None:
    # One batch holds every example (q = 1): Poisson sampling takes all, and Opacus's
    # mean over the expected batch size is the plain mean.
    cfg = make_config(*DP, "finetune.batch-size=32", "finetune.mode=full", "privacy.max-grad-norm=1e6",
                      f"privacy.grad-sample-mode={engine}")
    model, data, plan = _small(cfg)
    state = PrivacyState(noise_multiplier=0.0, sample_rate=1.0)
    private, plain = copy.deepcopy(model), copy.deepcopy(model)
    result, new = train_private(private, data, plan, cfg.finetune, cfg.privacy, state)
    sgd = train_local(plain, data, plan, cfg.finetune, seed=0)
    assert result.steps == plan.local_epochs == new.steps == sgd.steps
    assert result.loss == pytest.approx(sgd.loss, rel=1e-5)  # one loop, one objective: the same loss reported
    for (key, p), q in zip(private.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=key)


def test_only_trainable_units_change_and_frozen_batchnorm_stays_frozen() -> None:
    cfg = make_config(*DP)
    model = TransferModel(build_backbone("resnet18", 1), 10)  # BatchNorm in every block, all frozen
    model.set_trainable([])
    x, y = torch.randn(20, 1, 16, 16), torch.randint(0, 10, (20,))
    before = copy.deepcopy(model.state_dict())
    check_dp_plans(model, [RoundPlan({"head": 0.1}, 1)])
    train_private(model, LabelledImages(x, y, ("clean",) * 20), RoundPlan({"head": 0.1}, 1), cfg.finetune,
                  cfg.privacy, PrivacyState(1.0, 0.2))
    after = model.state_dict()
    for key in before:
        if key.startswith("blocks."):  # weights and running statistics, bit for bit
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert all(p.grad is None for p in model.blocks.parameters())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus let go of the model


@pytest.mark.parametrize("engine", ["hooks", "ghost"])
def test_a_dp_sgd_round_leaves_no_trace_of_opacus_on_the_model(engine: str) -> None:
    # Opacus wraps the model afresh each round; the model the client keeps, evaluates and replies must come
    # back as it was: no hooks on any module (the next round would add a second set), no per-sample state.
    from opacus.grad_sample.gsm_base import OPACUS_PARAM_MONKEYPATCH_ATTRS

    cfg = make_config(*DP, "finetune.mode=full", f"privacy.grad-sample-mode={engine}")
    model, data, plan = _small(cfg)

    def hooks(m: torch.nn.Module) -> list[int]:
        return [len(h) for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)]

    before = {name: hooks(m) for name, m in model.named_modules()}
    for _ in range(2):  # a second round wraps the model Opacus let go of
        train_private(model, data, plan, cfg.finetune, cfg.privacy, PrivacyState(1.0, 0.2))
        assert {name: hooks(m) for name, m in model.named_modules()} == before
        assert not any(hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())
        assert not [(name, attr) for name, p in model.named_parameters() for attr in OPACUS_PARAM_MONKEYPATCH_ATTRS
                    if hasattr(p, attr)]


def test_trainable_batchnorm_is_refused_with_the_fixes() -> None:
    cfg = make_config(*DP, "finetune.mode=gradual-unfreezing", "model.backbone=resnet18")
    model = TransferModel(build_backbone("resnet18", 1), 10)
    plans = [plan_round(cfg.finetune, model.block_names, r) for r in range(1, 4)]
    with pytest.raises(DPConfigError, match=r"BatchNorm layers \(layer4\..*model.norm = \"group\""):
        check_dp_plans(model, plans)
    assert model.trainable_units == ("head",)  # the check leaves the model as it found it
    grouped = TransferModel(build_backbone("resnet18", 1, norm="group"), 10)
    assert not any(isinstance(m, _BatchNorm) for m in grouped.modules())
    check_dp_plans(grouped, plans)


@pytest.mark.parametrize("mode", MODES.names())
def test_every_fine_tuning_mode_trains_under_dp_sgd(mode: str, task_identity: None) -> None:
    cfg = make_config(*DP, f"finetune.mode={mode}")
    (reply,) = _rounds(cfg, _context(), range(1, 2))
    model = build_model(cfg)
    expected = set(model.unit_keys(plan_round(cfg.finetune, model.block_names, 1).lrs))
    assert set(reply.content["arrays"].keys()) == expected
    assert reply.content["metrics"]["privacy.steps"] == 10


def test_noise_and_poisson_sampling_draw_independent_streams() -> None:
    """One seed for both would tie the noise's size to which records were sampled (and void the epsilon)."""
    from fedtl.clients.dp_sgd import dp_generators

    noise, sampler = dp_generators(torch.device("cpu"), torch.Generator().manual_seed(7))
    assert noise.initial_seed() == 7 and sampler.initial_seed() != 7
    u = torch.rand(10_000, generator=sampler)
    z = torch.normal(0.0, 1.0, (10_000,), generator=noise)
    assert abs(float(torch.corrcoef(torch.stack([u, z.abs()]))[0, 1])) < 0.05
    again = dp_generators(torch.device("cpu"), torch.Generator().manual_seed(7))[1]
    assert again.initial_seed() == sampler.initial_seed()  # reproducible when the noise is seeded
    a, b = dp_generators(torch.device("cpu"))
    assert a.initial_seed() != b.initial_seed()


def test_batchnorm_without_affine_terms_in_a_trainable_unit_is_refused() -> None:
    # BatchNorm2d(affine=False) has nothing to train, so a check for trainable parameters (and Opacus's
    # validator) passed it; in training it normalises with the batch's statistics all the same.
    from torch import nn

    from fedtl.models.backbones import Backbone
    from fedtl.privacy import check_dp_trainable

    block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = TransferModel(Backbone(blocks=[("a", block)], feature_dim=2), num_classes=2)
    model.set_trainable(["a"], head=True)
    model.train()
    x = torch.randn(2, 1, 6, 6)
    grads = []
    for second in (x[1], x[1] * 3 + 1):  # only example 1 changes ...
        model.zero_grad()
        model(torch.stack([x[0], second]))[0].sum().backward()  # ... and example 0's gradient moves
        grads.append(block[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(DPConfigError, match=r"DP-SGD cannot train BatchNorm layers \(a.1\)"):
        check_dp_trainable(model, model.trainable_units)
    model.set_trainable([], head=True)  # frozen, the block runs in eval mode on its running statistics
    check_dp_trainable(model, model.trainable_units)
