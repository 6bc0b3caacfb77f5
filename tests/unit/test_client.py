"""The ClientApp's training handler, called with real Flower messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedtl.clients.app import handle_train
from fedtl.errors import BackboneMismatchError
from fedtl.models.factory import build_model
from fedtl.models.modes import plan_round
from tests.conftest import make_config


def _instruction(cfg, fingerprint: str, rnd: int = 1) -> Message:
    model = build_model(cfg)
    plan = plan_round(cfg.finetune, model.block_names, rnd)
    plan.apply_to(model)
    config = ConfigRecord({**plan.to_config(), "backbone-fingerprint": fingerprint, "server-round": rnd})
    content = RecordDict({"arrays": ArrayRecord(model.travelling_state()), "config": config})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 2, "num-partitions": 5}, state=RecordDict(),
                   run_config={})


def test_client_trains_and_replies_only_travelling_tensors(task_identity: None) -> None:
    cfg = make_config("finetune.mode=gradual-unfreezing", "clients=5")
    fingerprint = build_model(cfg).backbone_fingerprint
    reply = handle_train(_instruction(cfg, fingerprint), _context(), cfg)
    sent = reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == {k for k in build_model(cfg).state_dict() if k.startswith(("blocks.conv3.", "head."))}
    assert reply.content["metrics"]["num-examples"] == 10
    original = build_model(cfg).state_dict()
    for key in sent:  # the unfrozen top block trained, not only the head
        assert not torch.equal(sent[key], original[key]), key


def test_client_refuses_a_different_backbone(task_identity: None) -> None:
    cfg = make_config("clients=5")
    mine = build_model(cfg).backbone_fingerprint
    with pytest.raises(BackboneMismatchError, match=f"server 0123456789abcdef, this node {mine}"):
        handle_train(_instruction(cfg, "0123456789abcdef"), _context(), cfg)


def test_client_refuses_a_split_other_than_the_runs(task_identity: None) -> None:
    cfg = make_config("clients=4")
    with pytest.raises(ValueError, match=r"partition 2 of 5 \(node config\) but the run config says clients = 4"):
        handle_train(_instruction(cfg, build_model(cfg).backbone_fingerprint), _context(), cfg)


def test_client_evaluates_on_its_own_test_images_and_a_held_out_one_adapts(task_identity: None) -> None:
    from fedtl.clients.app import handle_evaluate, handle_query, received_model
    from fedtl.clients.trainer import train_local
    from fedtl.data.federated import client_data, client_test_data
    from fedtl.models.metrics import evaluate_model
    from fedtl.seeds import derived_seed

    cfg = make_config("clients=5", "data.held-out-clients=1")
    fingerprint = build_model(cfg).backbone_fingerprint
    reply = handle_evaluate(_instruction(cfg, fingerprint), _context(), cfg)
    metrics = reply.content["metrics"]
    assert metrics["held-out"] == 0 and metrics["num-examples"] == len(client_test_data(cfg.data, 2, 5, cfg.seed)) > 0
    assert 0 <= metrics["accuracy"] <= 1 and "accuracy-before" not in metrics
    held = Context(run_id=1, node_id=9, node_config={"partition-id": 4, "num-partitions": 5}, state=RecordDict(),
                   run_config={})
    adapted = handle_evaluate(_instruction(cfg, fingerprint), held, cfg).content["metrics"]
    # What local fine-tuning of the received model gives, done here by hand.
    model, plan = received_model(_instruction(cfg, fingerprint), cfg)
    test = client_test_data(cfg.data, 4, 5, cfg.seed)
    before = evaluate_model(model, test)["accuracy"]
    train_local(model, client_data(cfg.data, 4, 5, cfg.seed), plan, cfg.finetune, seed=derived_seed("adapt:4", cfg.seed))
    assert adapted["held-out"] == 1 and adapted["accuracy-before"] == pytest.approx(before)
    assert adapted["accuracy"] == pytest.approx(evaluate_model(model, test)["accuracy"])
    assert handle_query(_instruction(cfg, fingerprint), held, cfg).content["metrics"]["held-out"] == 1
    declined = handle_train(_instruction(cfg, fingerprint), held, cfg)  # a server that did not filter it
    assert "arrays" not in declined.content.array_records
    assert "held out of training" in declined.content.config_records["declined"]["reason"]
