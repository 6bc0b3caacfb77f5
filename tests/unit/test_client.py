"""The ClientApp's training handler, called with real Flower messages."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from fedtl.clients.app import handle_train
from fedtl.errors import BackboneMismatchError
from fedtl.models.factory import build_model
from tests.helpers import make_config, node_context, train_instruction


def test_client_trains_and_replies_only_travelling_tensors(task_identity: None) -> None:
    cfg = make_config("finetune.mode=gradual-unfreezing", "clients=5")
    fingerprint = build_model(cfg).backbone_fingerprint
    reply = handle_train(train_instruction(cfg, fingerprint), node_context(), cfg)
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
        handle_train(train_instruction(cfg, "0123456789abcdef"), node_context(), cfg)


def test_client_refuses_a_split_other_than_the_runs(task_identity: None) -> None:
    cfg = make_config("clients=4")
    with pytest.raises(ValueError, match=r"partition 2 of 5 \(node config\) but the run config says clients = 4"):
        handle_train(train_instruction(cfg, build_model(cfg).backbone_fingerprint), node_context(), cfg)


def test_client_evaluates_on_its_own_test_images_and_a_held_out_one_adapts(task_identity: None) -> None:
    from fedtl.clients.app import handle_evaluate, handle_query, received_model
    from fedtl.clients.trainer import train_local
    from fedtl.data.federated import client_data, client_test_data
    from fedtl.models.metrics import evaluate_model
    from fedtl.seeds import derived_seed

    cfg = make_config("clients=5", "data.held-out-clients=1")
    fingerprint = build_model(cfg).backbone_fingerprint
    reply = handle_evaluate(train_instruction(cfg, fingerprint), node_context(), cfg)
    metrics = reply.content["metrics"]
    assert metrics["held-out"] == 0 and metrics["num-examples"] == len(client_test_data(cfg.data, 2, 5, cfg.seed)) > 0
    assert 0 <= metrics["accuracy"] <= 1 and "accuracy-before" not in metrics
    held = Context(run_id=1, node_id=9, node_config={"partition-id": 4, "num-partitions": 5}, state=RecordDict(),
                   run_config={})
    adapted = handle_evaluate(train_instruction(cfg, fingerprint), held, cfg).content["metrics"]
    # What local fine-tuning of the received model gives, done here by hand.
    model, plan = received_model(train_instruction(cfg, fingerprint), cfg)
    test = client_test_data(cfg.data, 4, 5, cfg.seed)
    before = evaluate_model(model, test)["accuracy"]
    train_local(model, client_data(cfg.data, 4, 5, cfg.seed), plan, cfg.finetune, seed=derived_seed("adapt:4", cfg.seed))
    assert adapted["held-out"] == 1 and adapted["accuracy-before"] == pytest.approx(before)
    assert adapted["accuracy"] == pytest.approx(evaluate_model(model, test)["accuracy"])
    assert handle_query(train_instruction(cfg, fingerprint), held, cfg).content["metrics"]["held-out"] == 1
    declined = handle_train(train_instruction(cfg, fingerprint), held, cfg)  # a server that did not filter it
    assert "arrays" not in declined.content.array_records
    assert "held out of training" in declined.content.config_records["declined"]["reason"]
