"""Personalisation: local-only tensors never travel, live in the node's state and make its personalised model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtl.clients.app import handle_evaluate, handle_train, received_model
from fedtl.clients.personal import personalised_model
from fedtl.config import ConfigError
from fedtl.data.federated import client_data, client_test_data
from fedtl.models.metrics import evaluate_model
from fedtl.personalisation import personal_plan, run_model
from fedtl.protocol import LOCAL_STATE
from fedtl.server.app import check_server_config
from fedtl.strategies.registry import build_strategy
from fedtl.strategies.transfer import Records, Travel, transfer_strategy
from tests.helpers import StaticGrid, make_config

NORMS = {f"blocks.conv{i}.1.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}  # the CNN's GroupNorms


def _instruction(cfg, rnd: int = 1, arrays: dict | None = None) -> Message:
    model = run_model(cfg)
    plan = personal_plan(cfg, model.block_names, rnd)
    plan.apply_to(model)
    config = ConfigRecord({**plan.to_config(), "backbone-fingerprint": model.backbone_fingerprint, "server-round": rnd})
    record = ArrayRecord(arrays if arrays is not None else model.travelling_state())
    return Message(RecordDict({"arrays": record, "config": config}), dst_node_id=1, message_type="train")


def _context(pid: int = 2) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": pid, "num-partitions": 5}, state=RecordDict(),
                   run_config={})


def test_local_keys_of_each_personalisation() -> None:
    full = "finetune.mode=full"
    assert run_model(make_config(full, "strategy.personalisation=fedper")).local_keys == {"head.weight", "head.bias"}
    assert run_model(make_config(full, "strategy.personalisation=fedrep")).local_keys == {"head.weight", "head.bias"}
    assert run_model(make_config(full, "strategy.personalisation=fedbn")).local_keys == NORMS
    model = run_model(make_config(full, "strategy.personalisation=fedbn"))
    model.set_trainable(model.block_names)
    assert not set(model.travelling_keys()) & NORMS and set(model.kept_keys(model.units)) == NORMS
    babu = make_config(full, "strategy.personalisation=fedbabu")
    assert "head" not in personal_plan(babu, ["conv1", "conv2", "conv3"], 1).lrs


def test_fedper_strategy_sends_and_merges_only_the_body(task_identity: None) -> None:
    cfg = make_config("finetune.mode=full", "strategy.personalisation=fedper", "clients=3")
    model = run_model(cfg)
    s = transfer_strategy(build_strategy(cfg), Travel(plan=lambda r: personal_plan(cfg, model.block_names, r),
                                                      keys_of=model.unit_keys, initial_state=model.state_dict(),
                                                      fingerprint="f"), records=Records(final_round=1))
    messages = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), StaticGrid([1, 2, 3])))
    body = [k for k in model.state_dict() if k.startswith("blocks.")]
    evaluations = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), StaticGrid([1, 2, 3])))
    assert len(evaluations) == 3
    for m in messages + evaluations:  # the ArrayRecords actually sent, for training and for evaluation
        assert list(m.content["arrays"].keys()) == body
    rng = np.random.default_rng(0)
    updates = [{k: rng.normal(size=tuple(model.state_dict()[k].shape)).astype(np.float32) for k in body}
               for _ in messages]
    sizes = [1, 3, 4]
    replies = [Message(RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in u.items()}),
                                   "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0})}), reply_to=m)
               for m, u, n in zip(messages, updates, sizes)]
    merged, _ = s.aggregate_train(1, replies)
    assert list(merged.keys()) == body
    for k in body:  # FedAvg's rule on the travelling keys: the example-weighted mean
        expected = sum(n * u[k] for n, u in zip(sizes, updates)) / sum(sizes)
        np.testing.assert_allclose(merged[k].numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedper", "fedrep", "fedbn"])
def test_client_keeps_local_tensors_in_its_state_and_never_sends_them(task_identity: None, name: str) -> None:
    cfg = make_config("finetune.mode=full", f"strategy.personalisation={name}", "clients=5")
    model = run_model(cfg)
    context = _context()
    reply = handle_train(_instruction(cfg), context, cfg)
    sent = set(reply.content["arrays"].keys())
    assert sent and not sent & model.local_keys and sent == set(model.unit_keys(model.units))
    kept = context.state.array_records[LOCAL_STATE].to_torch_state_dict()
    assert set(kept) == set(model.local_keys)
    initial = model.state_dict()
    assert all(not torch.equal(kept[k], initial[k]) for k in kept)  # they trained
    # Round 2 starts from this node's own local tensors, not the initial ones.
    reply2 = handle_train(_instruction(cfg, 2), context, cfg)
    assert set(reply2.content["arrays"].keys()) == sent
    mine = personalised_model(received_model(_instruction(cfg, 2), cfg)[0], _context(), cfg,
                              client_data(cfg.data, 2, 5, cfg.seed), seed=0)
    assert all(torch.equal(mine.state_dict()[k], initial[k]) for k in kept)  # a fresh node has nothing of its own


def test_fedrep_trains_the_head_first_then_the_body(task_identity: None) -> None:
    cfg = make_config("finetune.mode=full", "strategy.personalisation=fedrep", "strategy.head-epochs=3", "clients=5")
    context = _context()
    reply = handle_train(_instruction(cfg), context, cfg)
    # Three head epochs, then the plan's two local epochs of the body: steps of the body phase only.
    per_epoch = -(-len(client_data(cfg.data, 2, 5, cfg.seed)) // cfg.finetune.batch_size)
    assert reply.content["metrics"]["steps"] == cfg.finetune.local_epochs * per_epoch
    assert set(context.state.array_records[LOCAL_STATE].keys()) == {"head.weight", "head.bias"}


def test_fedbabu_freezes_the_head_and_tunes_it_only_for_personal_evaluation(task_identity: None) -> None:
    from fedtl.clients.trainer import train_local
    from fedtl.personalisation import head_plan
    from fedtl.seeds import derived_seed

    cfg = make_config("finetune.mode=full", "strategy.personalisation=fedbabu", "clients=5")
    context = _context()
    reply = handle_train(_instruction(cfg), context, cfg)
    assert not any(k.startswith("head.") for k in reply.content["arrays"].keys())
    assert LOCAL_STATE not in context.state.array_records  # nothing is local: the head did not train
    metrics = handle_evaluate(_instruction(cfg), context, cfg).content["metrics"]
    model, _ = received_model(_instruction(cfg), cfg)
    test, data = client_test_data(cfg.data, 2, 5, cfg.seed), client_data(cfg.data, 2, 5, cfg.seed)
    assert metrics["accuracy"] == pytest.approx(evaluate_model(model, test)["accuracy"])
    head_plan(cfg).apply_to(model)
    train_local(model, data, head_plan(cfg), cfg.finetune, seed=derived_seed("tune-head:2", cfg.seed))
    assert metrics["accuracy-personal"] == pytest.approx(evaluate_model(model, test)["accuracy"])


def test_personal_evaluation_without_personalisation_is_the_global_model(task_identity: None) -> None:
    cfg = make_config("clients=5")
    metrics = handle_evaluate(_instruction(cfg), _context(), cfg).content["metrics"]
    assert metrics["accuracy-personal"] == metrics["accuracy"]


@pytest.mark.parametrize(("sets", "message"), [
    (("strategy.personalisation=fedper",), "leaves nothing to federate in round 1.*only \\['head'\\]"),
    (("strategy.personalisation=fedbabu",), "leaves nothing to federate"),
    (("strategy.personalisation=fedbn",), "would keep nothing local.*FedBN needs trainable normalisation"),
    (("strategy.personalisation=fedbn", "finetune.mode=lora"), "would keep nothing local"),
])
def test_personalisations_that_cannot_work_are_refused_before_round_one(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_server_config(make_config(*sets))
    check_server_config(make_config("strategy.personalisation=fedbn", "finetune.mode=bn-only"))  # head travels, norms stay


def test_fedrep_under_dp_sgd_is_refused() -> None:
    with pytest.raises(ConfigError, match="fedrep.*dp-sgd.*outside the DP-SGD accountant"):
        make_config("strategy.personalisation=fedrep", "privacy.mode=dp-sgd", "finetune.mode=full")


def test_client_level_dp_refuses_to_noise_batchnorm_statistics() -> None:
    from fedtl.errors import DPConfigError

    with pytest.raises(DPConfigError, match="client-level DP would add noise to BatchNorm statistics"):
        check_server_config(make_config("privacy.mode=client-level", "model.backbone=small-cnn-bn", "finetune.mode=full",
                              "finetune.batchnorm=batch"))
    check_server_config(make_config("privacy.mode=client-level", "model.backbone=small-cnn-bn", "finetune.mode=lora"))
    # Frozen statistics (a pre-trained backbone's default) do not travel, so there is nothing to noise.
    check_server_config(make_config("privacy.mode=client-level", "model.backbone=small-cnn-bn", "finetune.mode=full"))
