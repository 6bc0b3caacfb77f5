"""The node's privacy gate, through the real ClientApp: what a node's owner allows holds whatever the server sends."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtl.clients.app import make_client_app
from fedtl.clients.gate import FLOORS, RELEASES
from fedtl.clients.spend import node_epsilon
from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.models.factory import build_model
from fedtl.protocol import CONFIG, FINGERPRINT, HEAD_START, SERVER_ROUND
from tests.helpers import make_config, train_instruction

SMALL = ("clients=5", "labelled-per-client=20", "finetune.batch-size=4", "local-epochs=2")


def _node(**node_config: object) -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": 2, "num-partitions": 5, **node_config},
                   state=RecordDict(), run_config={})


def _ask(cfg: ExperimentConfig, context: Context, message_type: str) -> Message:
    """The ClientApp's answer to a message of ``message_type`` carrying a training round's content."""
    msg = train_instruction(cfg, build_model(cfg).backbone_fingerprint)
    if message_type == HEAD_START:  # what the server sends for FedNCM: the fingerprint, no tensor
        msg = Message(RecordDict({CONFIG: ConfigRecord({FINGERPRINT: build_model(cfg).backbone_fingerprint,
                                                        SERVER_ROUND: 0})}), dst_node_id=1, message_type=HEAD_START)
    elif message_type != "train":
        msg = Message(msg.content, dst_node_id=1, message_type=message_type)
    reply = make_client_app(cfg.to_run_config())(msg, context)
    assert not reply.has_error(), reply.error.reason
    return reply


def _declined(reply: Message) -> str | None:
    records = reply.content.config_records
    return str(records["declined"]["reason"]) if "declined" in records else None


@pytest.mark.parametrize("mode", ["off", "client-level"])
def test_a_capped_node_declines_training_its_accountant_cannot_count(task_identity: None, tmp_path: Path,
                                                                     mode: str) -> None:
    # Before the gate: trained arrays and a train loss (1.894) from a node capped at 1e-3.
    cfg = make_config(*SMALL, f"privacy.mode={mode}")
    capped = _node(**{"state-dir": str(tmp_path), "max-epsilon": 1e-3})
    reply = _ask(cfg, capped, "train")
    assert "arrays" not in reply.content.array_records and "train-loss" not in reply.content["metrics"]
    assert "answers only 'accounted' releases (its max-epsilon cap" in _declined(reply)
    assert reply.content["metrics"]["partition-id"] == 2  # the server's ledger can name it
    assert list(tmp_path.iterdir()) == []  # nothing spent, nothing trained
    assert _declined(_ask(cfg, _node(), "train")) is None  # the same message, no cap: it trains


def test_the_head_start_query_is_declined_by_a_capped_node_and_under_any_dp_mode(task_identity: None,
                                                                                 tmp_path: Path) -> None:
    # Before the gate: exact per-class sums and counts ([2,2,0,3,1,1,3,3,3,2]) from either node.
    ncm = make_config(*SMALL, "finetune.head-init=ncm")
    assert "counts" in _ask(ncm, _node(), HEAD_START).content["class-sums"]  # uncapped, no DP: answered
    capped = _ask(ncm, _node(**{"state-dir": str(tmp_path), "max-epsilon": 5.0}), HEAD_START)
    assert "class-sums" not in capped.content.array_records and "a head-start release" in _declined(capped)
    # A run under DP-SGD (the config refuses the head start, a crafted server sends the query anyway).
    dp = _ask(make_config(*SMALL, "privacy.mode=dp-sgd"), _node(), HEAD_START)
    assert "class-sums" not in dp.content.array_records
    assert "declines a head-start release under privacy.mode = \"dp-sgd\"" in _declined(dp)


def test_evaluation_that_trains_outside_the_accountant_is_declined_and_plain_evaluation_is_not(
        task_identity: None, tmp_path: Path) -> None:
    cap = {"state-dir": str(tmp_path), "max-epsilon": 5.0}
    cfg = make_config(*SMALL, "privacy.mode=dp-sgd")
    plain = _ask(cfg, _node(**cap), "evaluate")
    assert _declined(plain) is None and "accuracy" in plain.content["metrics"]
    # A held-out node adapts the model on its training split without DP before it evaluates.
    held_cfg = make_config(*SMALL, "privacy.mode=dp-sgd", "data.held-out-clients=1")
    held = _ask(held_cfg, _node(**{**cap, "partition-id": 4}), "evaluate")  # the last partition is held out
    assert "accuracy" not in held.content["metrics"] and "evaluation-training release" in _declined(held)
    # The owner's strictest floor: DP-SGD training and the count only.
    strict = _node(answers="dp-sgd")
    assert "answers only 'dp-sgd' releases" in _declined(_ask(cfg, strict, "evaluate"))
    assert _ask(cfg, strict, "query").content["metrics"]["num-examples"] == 20
    assert _declined(_ask(cfg, strict, "train")) is None
    # A statistics query added later, that declares no release, answers nothing: its handler never runs.
    app = make_client_app(cfg.to_run_config())
    app.query("feature_stats")(lambda msg, context: pytest.fail("the handler ran"))
    reply = app(Message(RecordDict(), dst_node_id=1, message_type="query.feature_stats"), _node())
    assert "no release of that kind is declared" in _declined(reply)
    with pytest.raises(ConfigError, match="answers='everything' is none of dp-sgd, accounted, all"):
        _ask(cfg, _node(answers="everything"), "train")


def test_fedbabu_is_refused_under_dp_sgd_and_every_release_is_documented() -> None:
    # FedBABU tuned its head on the training split at every evaluation, without DP, and replied its accuracy.
    with pytest.raises(ConfigError, match="FedBABU tunes each client's head on its training split"):
        make_config("privacy.mode=dp-sgd", "strategy.personalisation=fedbabu")
    table = (Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    for name in RELEASES.names():
        assert f"| `{name}` |" in table, name
    for floor in FLOORS:
        assert f"`\"{floor}\"`" in table, floor


def _one_round(run_id: int, state_dir: str, cap: float, start: multiprocessing.synchronize.Barrier,
               out: str) -> None:
    """A process of its own: one DP-SGD round of run ``run_id`` on a node sharing ``state_dir``."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedtl.clients.app import base_model
    from fedtl.clients.node_data import node_data

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1  # as the conftest's fixture

    cfg = make_config(*SMALL, "privacy.mode=dp-sgd")
    context = Context(run_id=run_id, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 2, "num-partitions": 5, "state-dir": state_dir, "max-epsilon": cap})
    app, msg = make_client_app(cfg.to_run_config()), train_instruction(cfg, base_model(cfg).backbone_fingerprint)
    node_data(context, cfg).train()  # read before the start: both rounds check their cap at once
    start.wait(timeout=120)
    reply = app(msg, context)
    Path(out).write_text(json.dumps({"trained": "arrays" in reply.content.array_records}))


def test_two_runs_sharing_a_state_dir_never_spend_past_the_cap(task_identity: None, tmp_path: Path) -> None:
    # 20 examples, batches of 4, 2 epochs: 10 steps a round at q = 0.2, σ = 1. The cap fits one round, not two.
    one, two = (node_epsilon([(1.0, 0.2, n)], 1e-5) for n in (10, 20))
    cap = (one + two) / 2
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    runs = [spawn.Process(target=_one_round, args=(run, str(tmp_path / "state"), cap, start, str(tmp_path / f"{run}")))
            for run in (1, 2)]
    for p in runs:
        p.start()
    for p in runs:
        p.join(timeout=300)
        assert p.exitcode == 0
    trained = [json.loads((tmp_path / f"{run}").read_text())["trained"] for run in (1, 2)]
    # Without the lock both read the empty folder, both passed, both trained: lifetime ε past the cap.
    assert sorted(trained) == [False, True]
    lifetime = [h for f in (tmp_path / "state").glob("run-*-privacy.json") for h in json.loads(f.read_text())["history"]]
    assert node_epsilon([tuple(h) for h in lifetime], 1e-5) <= cap
