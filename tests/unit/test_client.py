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


@pytest.mark.parametrize("sets", [("finetune.mode=gradual-unfreezing",), ("strategy.personalisation=fedper",),
                                  ("finetune.mode=lora",)])
def test_training_shares_only_the_parameters_it_never_writes(task_identity: None, monkeypatch: pytest.MonkeyPatch,
                                                             sets: tuple[str, ...]) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message

    import fedtl.clients.app as client_app
    from fedtl.models.modes import plan_round
    from fedtl.personalisation import run_model
    from fedtl.protocol import ARRAYS, CONFIG, FINGERPRINT, SERVER_ROUND

    cfg = make_config(*sets, "clients=5")
    fingerprint = build_model(cfg).backbone_fingerprint

    def instruction(rnd: int) -> Message:  # as the server sends it: the run's model's travelling tensors
        model = run_model(cfg)
        plan = plan_round(cfg.finetune, model.block_names, rnd)
        plan.apply_to(model)
        config = ConfigRecord({**plan.to_config(), FINGERPRINT: fingerprint, SERVER_ROUND: rnd})
        return Message(RecordDict({ARRAYS: ArrayRecord(model.travelling_state()), CONFIG: config}), dst_node_id=1,
                       message_type="train")

    messages = [instruction(rnd) for rnd in (1, 2, 3)]  # gradual unfreezing: more each round

    def replies() -> list[dict[str, torch.Tensor]]:
        context = node_context()  # one node over three rounds: its local tensors come back each round
        return [handle_train(m, context, cfg).content["arrays"].to_torch_state_dict() for m in messages]

    shared = replies()
    run = client_app.base_model(cfg).state_dict()
    for key, value in run_model(cfg).state_dict().items():  # the run's model: as built, whatever trained beside it
        torch.testing.assert_close(run[key], value, rtol=0, atol=0, msg=key)
    received = client_app.received_model
    monkeypatch.setattr(client_app, "received_model", lambda *a, **k: received(*a, **{**k, "share_frozen": False}))
    for a, b in zip(shared, replies(), strict=True):  # what every parameter copied gives
        assert list(a) == list(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_frozen_parameter_is_the_run_models_own_and_a_trained_one_a_copy(task_identity: None) -> None:
    from fedtl.clients.app import base_model, checked_model

    cfg = make_config("clients=5")
    config = train_instruction(cfg, build_model(cfg).backbone_fingerprint).content["config"]
    base = dict(base_model(cfg).named_parameters())
    mine = dict(checked_model(config, cfg, written={"head.weight"}).named_parameters())
    assert mine["head.weight"] is not base["head.weight"]
    assert all(mine[k] is base[k] for k in base if k != "head.weight")
    assert all(b is not a for a, b in zip(base_model(cfg).buffers(), checked_model(config, cfg, set()).buffers(),
                                          strict=True))  # buffers always copied
