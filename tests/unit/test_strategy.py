"""The transfer strategy around Flower's FedAvg, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtl.errors import RoundFailedError, RunStoppedError
from fedtl.protocol import RoundPlan
from fedtl.strategies.registry import build_strategy
from fedtl.strategies.roster import Roster
from fedtl.strategies.transfer import Records, ReplyLimits, Sampling, transfer_strategy
from tests.helpers import INITIAL, TRAVEL, StaticGrid, configure_round_one, keys_of, make_config, plan, strategy


def reply(to: Message, arrays: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: torch.as_tensor(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n, "train-loss": float(n)})})
    return Message(content=content, reply_to=to)


def test_configure_train_sends_only_the_plan_and_grows_keys_from_initial_state(task_identity: None) -> None:
    s = strategy()
    global_r1 = ArrayRecord({"head.w": torch.ones(2, 2), "head.b": torch.ones(2)})
    messages = list(s.configure_train(2, global_r1, ConfigRecord(), StaticGrid([11, 12, 13])))
    assert len(messages) == 3 and {m.metadata.dst_node_id for m in messages} == {11, 12, 13}
    sent = messages[0].content["arrays"].to_torch_state_dict()
    assert list(sent) == ["blocks.a.w", "head.w", "head.b"]
    assert torch.equal(sent["blocks.a.w"], INITIAL["blocks.a.w"])  # newly unfrozen: pre-trained value
    assert torch.equal(sent["head.w"], torch.ones(2, 2))  # already travelling: the global value
    config = messages[0].content["config"]
    assert RoundPlan.from_config(config) == plan(2)
    assert config["backbone-fingerprint"] == "f00d" and config["server-round"] == 2


def test_aggregate_is_the_weighted_mean_of_travelling_keys(task_identity: None) -> None:
    observed: list = []
    s = strategy(observed)
    out = list(s.configure_train(2, ArrayRecord({"head.w": torch.ones(2, 2), "head.b": torch.ones(2)}),
                                 ConfigRecord(), StaticGrid([1, 2, 3])))
    rng = np.random.default_rng(0)
    updates = [{k: rng.normal(size=INITIAL[k].shape).astype(np.float32) for k in keys_of(["a", "head"])}
               for _ in range(3)]
    weights = [10, 30, 60]
    arrays, metrics = s.aggregate_train(2, [reply(m, u, n) for m, u, n in zip(out, updates, weights)])
    merged = arrays.to_torch_state_dict()
    for key in keys_of(["a", "head"]):
        expected = sum(w * u[key] for w, u in zip(weights, updates)) / sum(weights)
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx((10 * 10 + 30 * 30 + 60 * 60) / 100)
    (rnd, info), = observed
    assert rnd == 2 and info["clients_ok"] == 3 and info["clients_failed"] == 0
    assert info["bytes_up"] == info["bytes_down"] == 3 * out[0].content["arrays"].count_bytes()


def test_updates_with_other_keys_are_refused(task_identity: None) -> None:
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2])
    good = {"head.w": np.ones((2, 2), np.float32), "head.b": np.ones(2, np.float32)}
    leaky = {**good, "blocks.a.w": np.zeros(2, np.float32)}  # a frozen block that must not travel
    arrays, _ = s.aggregate_train(1, [reply(out[0], good, 5), reply(out[1], leaky, 5)])
    assert set(arrays.keys()) == {"head.w", "head.b"}
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])
    assert observed[0][1]["clients_ok"] == 1 and observed[0][1]["clients_failed"] == 1


@pytest.mark.parametrize(
    ("update", "problem"),
    [
        ({"head.w": np.ones((2, 3), np.float32), "head.b": np.ones(2, np.float32)}, "head.w is float32[2, 3]"),
        ({"head.w": np.ones((2, 2), np.float64), "head.b": np.ones(2, np.float32)}, "head.w is float64[2, 2]"),
        ({"head.w": np.full((2, 2), np.nan, np.float32), "head.b": np.ones(2, np.float32)}, "NaN or infinite"),
    ],
)
def test_malformed_updates_are_not_merged(task_identity: None, caplog: pytest.LogCaptureFixture,
                                          update: dict, problem: str) -> None:
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2])
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    arrays, _ = s.aggregate_train(1, [reply(out[0], good, 5), reply(out[1], update, 5)])
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])  # only the good one merged
    assert observed[0][1]["clients_failed"] == 1
    assert problem in caplog.text


def test_a_round_with_nothing_to_merge_stops_the_run(task_identity: None) -> None:
    s = strategy()
    out = configure_round_one(s, [1, 2, 3])
    failed = Message(Error(code=0, reason="disk on fire"), reply_to=out[0])
    no_arrays = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=out[1])
    with pytest.raises(RoundFailedError, match=r"round 1: no client update could be merged.*disk on fire.*"
                                               r"no 'arrays' ArrayRecord"):
        s.aggregate_train(1, [failed, no_arrays])  # the third node never answered


def test_timeouts_count_as_failed(task_identity: None) -> None:
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2, 3])
    good = {"head.w": np.ones((2, 2), np.float32), "head.b": np.ones(2, np.float32)}
    s.aggregate_train(1, [reply(out[0], good, 5)])
    assert observed[0][1]["clients_ok"] == 1 and observed[0][1]["clients_failed"] == 2


def declining(to: Message, reason: str) -> Message:
    """A reply that declines the round, as a client whose privacy budget is spent sends it."""
    content = RecordDict({"metrics": MetricRecord({"privacy.epsilon": 3.0}),
                          "declined": ConfigRecord({"reason": reason})})
    return Message(content=content, reply_to=to)


def test_declined_clients_are_counted_apart_and_the_round_goes_on(task_identity: None) -> None:
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2, 3])
    good = {"head.w": np.ones((2, 2), np.float32), "head.b": np.ones(2, np.float32)}
    arrays, _ = s.aggregate_train(1, [reply(out[0], good, 5), declining(out[1], "budget spent")])
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])
    totals = observed[0][1]
    assert (totals["clients_ok"], totals["clients_declined"], totals["clients_failed"]) == (1, 1, 1)


def test_declined_clients_are_not_sampled_again_and_too_few_left_ends_the_run(task_identity: None) -> None:
    observed: list = []
    s = transfer_strategy(build_strategy(make_config("clients=3")), TRAVEL, sampling=Sampling(min_nodes=2),
                          records=Records(observer=lambda report: observed.append((report.round, report.totals))))
    out = configure_round_one(s, [1, 2, 3])
    good = {"head.w": np.ones((2, 2), np.float32), "head.b": np.ones(2, np.float32)}
    s.aggregate_train(1, [reply(out[0], good, 5), declining(out[1], "budget spent"), reply(out[2], good, 5)])
    out_of_budget = out[1].metadata.dst_node_id
    assert {m.metadata.dst_node_id for m in configure_round_one(s, [1, 2, 3])} == {1, 2, 3} - {out_of_budget}
    everyone_declines = configure_round_one(s, [1, 2, 3])
    assert s.aggregate_train(1, [declining(m, "budget spent") for m in everyone_declines]) == (None, None)
    assert observed[-1][1]["clients_declined"] == 2  # recorded, and the model stays as it was
    with pytest.raises(RunStoppedError, match="0 client\\(s\\) can still train, fewer than the 2 a round needs; "
                                              "3 declined for good \\(budget spent\\)"):
        configure_round_one(s, [1, 2, 3])


def test_epsilons_and_ids_are_never_averaged_over_clients(task_identity: None) -> None:
    s = strategy()
    out = configure_round_one(s, [1, 2])
    good = {"head.w": np.ones((2, 2), np.float32), "head.b": np.ones(2, np.float32)}
    replies = [reply(m, good, 5) for m in out]
    for i, r in enumerate(replies):
        r.content["metrics"]["privacy.epsilon"], r.content["metrics"]["partition-id"] = 2.0 + i, i
    _, metrics = s.aggregate_train(1, replies)
    assert set(metrics.keys()) == {"train-loss"}


class AnsweringGrid(StaticGrid):
    """Nodes that answer Flower's query: node ids >= 100 are held out."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return [Message(RecordDict({"metrics": MetricRecord({"held-out": int(m.metadata.dst_node_id >= 100)})}),
                        reply_to=m) for m in messages if m.metadata.dst_node_id != 7]  # node 7 is silent


def test_held_out_and_silent_nodes_are_not_trained_but_all_evaluate(task_identity: None) -> None:

    evaluated: list = []
    s = transfer_strategy(
        build_strategy(make_config("clients=3")), TRAVEL, roster=Roster(timeout=5),
        records=Records(final_round=2, on_evaluate=lambda rnd, clients, sample: evaluated.append((rnd, clients, sample))),
    )
    grid = AnsweringGrid([1, 2, 7, 100])
    head = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    trained = {m.metadata.dst_node_id for m in s.configure_train(1, head, ConfigRecord(), grid)}
    assert trained == {1, 2}
    assert list(s.configure_evaluate(1, head, ConfigRecord(), grid)) == []  # only after the final round
    arrays = ArrayRecord({k: INITIAL[k] for k in keys_of(["a", "head"])})
    final = list(s.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert {m.metadata.dst_node_id for m in final} == {1, 2, 7, 100}
    assert set(final[0].content["arrays"].keys()) == set(keys_of(["a", "head"]))
    replies = [Message(RecordDict({"metrics": MetricRecord({"accuracy": a, "held-out": h})}), reply_to=m)
               for m, a, h in zip(final, [0.5, 0.7, 0.9, 0.1], [0, 0, 0, 1])]
    assert s.aggregate_evaluate(2, replies)["client-accuracy-mean"] == pytest.approx(0.7)
    assert [c["accuracy"] for c in evaluated[0][1]] == [0.5, 0.7, 0.9, 0.1]
    assert evaluated[0][2] == (4, 4)  # every node of 4 was asked


class DrawingGrid(AnsweringGrid):
    """``AnsweringGrid`` whose queries draw from Python's ``random``, as Ray does when a simulation's actors start
    (in a resumed run, its first round's queries start them)."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        import random

        random.random()
        return super().send_and_receive(messages, timeout=timeout)


def test_a_held_out_node_is_replaced_by_the_same_draw_whoever_else_draws_from_random(task_identity: None) -> None:
    nodes = list(range(1, 41)) + list(range(100, 160))  # 40 train, 60 held out: most rounds need replacements
    trained = []
    for grid in (AnsweringGrid(nodes), DrawingGrid(nodes)):
        s = transfer_strategy(build_strategy(make_config("clients=100", "strategy.fraction-train=0.1")), TRAVEL,
                              roster=Roster(timeout=5), sampling=Sampling(most=10, seed=3))
        head = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
        trained.append([[m.metadata.dst_node_id for m in s.configure_train(rnd, head, ConfigRecord(), grid)]
                        for rnd in (1, 2, 3)])
    assert trained[0] == trained[1]
    assert all(len(r) == 10 and max(r) <= 40 for r in trained[0])  # ten a round, none held out


def test_an_array_whose_data_differs_from_its_declared_shape_is_not_merged(task_identity: None,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    import io

    from flwr.app import Array

    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2])
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    buf = io.BytesIO()
    np.save(buf, np.full(1, 1e6, np.float32), allow_pickle=False)  # one value, declared as a 2 x 2 matrix
    lying = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=buf.getvalue())
    bad = reply(out[1], good, 5)
    bad.content["arrays"]["head.w"] = lying
    arrays, _ = s.aggregate_train(1, [reply(out[0], good, 5), bad])
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])  # not broadcast into every row
    assert observed[0][1]["clients_failed"] == 1
    assert "head.w holds float32[1], declared float32[2, 2]" in caplog.text


def _with(msg: Message, change: str) -> Message:
    if change == "extra metric":
        msg.content["metrics"]["surprise"] = 1.0
    elif change == "missing metric":
        del msg.content["metrics"]["train-loss"]
    elif change == "second ArrayRecord":
        msg.content["more"] = ArrayRecord({"x": torch.ones(1)})
    elif change == "NaN metric":
        msg.content["metrics"]["train-loss"] = float("nan")
    elif change == "negative examples":
        msg.content["metrics"]["num-examples"] = -24
    return msg


@pytest.mark.parametrize(("change", "problem"), [
    ("extra metric", "unexpected ['surprise']"),
    ("missing metric", "missing ['train-loss']"),
    ("second ArrayRecord", "records the protocol does not have: ['more']"),
    ("NaN metric", "metric 'train-loss' is nan, not a finite number"),
    ("negative examples", "num-examples is -24: a weight must count at least one example"),
])
def test_a_reply_off_the_protocol_is_dropped_with_its_reason_and_the_round_goes_on(
        task_identity: None, caplog: pytest.LogCaptureFixture, change: str, problem: str) -> None:
    # Flower's FedAvg alone raises InconsistentMessageReplies on the first two, ending the run unnamed.
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2, 3])
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    odd = _with(reply(out[2], {k: v * 100 for k, v in good.items()}, 5), change)
    arrays, _ = s.aggregate_train(1, [reply(out[0], good, 5), reply(out[1], good, 5), odd])
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])
    assert observed[0][1]["clients_ok"] == 2 and observed[0][1]["clients_failed"] == 1
    assert problem in caplog.text and f"node {odd.metadata.src_node_id}" in caplog.text


def test_a_reply_whose_unit_weight_is_not_1_is_dropped(task_identity: None, caplog: pytest.LogCaptureFixture) -> None:
    # Client-level DP's noise is scaled to equal weights: a client weighting itself 1000 would outweigh the rest.
    observed: list = []
    s = strategy(observed)
    out = configure_round_one(s, [1, 2])
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    replies = [reply(m, good, 5) for m in out]
    for r, weight in zip(replies, (1, 1000), strict=True):
        r.content["metrics"]["unit-weight"] = weight
    s.aggregate_train(1, replies)
    assert observed[0][1]["clients_ok"] == 1 and "unit-weight is 1000: a unit weight is 1" in caplog.text


class DeclaringGrid(StaticGrid):
    """Nodes that answer Flower's query, each declaring 5 training examples."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return [Message(RecordDict({"metrics": MetricRecord({"held-out": 0, "num-examples": 5})}), reply_to=m)
                for m in messages]


@pytest.mark.parametrize(("claimed", "max_examples", "problem"), [
    (10**12, float("inf"), "num-examples is 1e+12, more than the 5 it may count"),  # more than it declared
    (5, 4, "num-examples is 5, more than the 4 it may count"),  # strategy.max-examples
])
def test_a_reply_counting_more_examples_than_it_may_is_dropped(
        task_identity: None, caplog: pytest.LogCaptureFixture, claimed: int, max_examples: float,
        problem: str) -> None:

    observed: list = []
    s = transfer_strategy(build_strategy(make_config("clients=3")), TRAVEL, roster=Roster(timeout=5),
                          records=Records(observer=lambda report: observed.append(report.totals)),
                          limits=ReplyLimits(max_examples=max_examples))
    out = list(s.configure_train(1, ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])}), ConfigRecord(),
                                 DeclaringGrid([1, 2, 3])))
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    honest = 4 if max_examples == 4 else 5
    replies = [reply(out[0], good, honest), reply(out[1], good, honest), reply(out[2], {"head.w": -good["head.w"],
                                                                                       "head.b": good["head.b"]}, claimed)]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["head.w"].numpy(), good["head.w"])  # the big claim took nothing over
    assert observed[0]["clients_ok"] == 2 and observed[0]["clients_failed"] == 1
    assert problem in caplog.text


@pytest.mark.parametrize(("attack", "problem"), [
    ("scaled", "head.w moved by 6e+06 per value"),
    ("float max", "moved by 1.7e+38 per value"),
])
def test_an_update_that_moves_too_far_is_dropped(task_identity: None, caplog: pytest.LogCaptureFixture,
                                                 attack: str, problem: str) -> None:
    observed: list = []
    s = transfer_strategy(build_strategy(make_config("clients=3")), TRAVEL,
                          records=Records(observer=lambda report: observed.append(report.totals)),
                          limits=ReplyLimits(max_update_ratio=100.0))
    out = configure_round_one(s, [1, 2, 3])
    sent = {k: out[0].content["arrays"][k].numpy() for k in keys_of(["head"])}
    honest = {k: v + 0.5 for k, v in sent.items()}  # a big honest step: RMS 0.5 per value, far under the bound
    if attack == "scaled":
        bad = {k: v + 6.0 * 1e6 for k, v in sent.items()}  # a ×1e6 model-replacement step (a step of 6)
    else:
        bad = {k: np.full_like(v, np.finfo(np.float32).max / 2) for k, v in sent.items()}  # finite, not NaN
    arrays, _ = s.aggregate_train(1, [reply(out[0], honest, 5), reply(out[1], honest, 5), reply(out[2], bad, 5)])
    np.testing.assert_allclose(arrays["head.w"].numpy(), honest["head.w"], rtol=1e-6)
    assert observed[0]["clients_ok"] == 2 and observed[0]["clients_failed"] == 1
    assert problem in caplog.text and "strategy.max-update-ratio 100" in caplog.text


class LateDataGrid(StaticGrid):
    """Node 3 cannot read its data while ``late``: it answers Flower's query with ``how`` (an error,
    or no count); then it declares 5 training examples, as the others do."""

    def __init__(self, ids: list[int], how: str) -> None:
        super().__init__(ids)
        self.asked: list[int] = []
        self.late, self.how = True, how

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        out = []
        for m in messages:
            self.asked.append(m.metadata.dst_node_id)
            if m.metadata.dst_node_id == 3 and self.late and self.how == "error":
                out.append(Message(Error(code=0, reason="data-path '/nope' does not exist on this node"), reply_to=m))
                continue
            count = {} if m.metadata.dst_node_id == 3 and self.late else {"num-examples": 5}
            out.append(Message(RecordDict({"metrics": MetricRecord({"held-out": 0, **count})}), reply_to=m))
        return out


@pytest.mark.parametrize("how", ["error", "no count"])
def test_a_node_that_could_not_count_its_data_trains_is_refused_and_is_asked_again(
        task_identity: None, caplog: pytest.LogCaptureFixture, how: str) -> None:
    # A SuperNode whose data-path is missing (or an app without a query handler) must still be
    # sampled, so its training error (which names the fix) is recorded; it was never trained, and a
    # round waiting for it hung (a deployment's kill test, and a simulation whose clients all fail).

    observed: list = []
    s = transfer_strategy(build_strategy(make_config("clients=3")), TRAVEL, roster=Roster(timeout=5),
                          records=Records(observer=lambda report: observed.append(report.totals)))
    grid = LateDataGrid([1, 2, 3], how)
    head = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    good = {"head.w": np.full((2, 2), 3.0, np.float32), "head.b": np.ones(2, np.float32)}
    for late in (True, False):  # round 1's plan twice: only node 3's answer changes
        grid.late = late
        out = list(s.configure_train(1, head, ConfigRecord(), grid))
        assert {m.metadata.dst_node_id for m in out} == {1, 2, 3}
        s.aggregate_train(1, [reply(m, good, 5) for m in out])
    assert grid.asked.count(1) == 1 and grid.asked.count(3) == 2  # asked again each round it is sampled uncounted
    assert (observed[0]["clients_ok"], observed[0]["clients_failed"]) == (2, 1)
    assert "declared no training examples when asked" in caplog.text
    assert (observed[1]["clients_ok"], observed[1]["clients_failed"]) == (3, 0)
    if how == "error":
        assert "does not exist on this node" in caplog.text  # the node's own reason, logged
