"""LoRA merging by hand: the update B·A, the merge error of averaging A and B apart."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from fedtl.strategies.lora import lora_layers, merge_error, product


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(4, 6, 1)])
def test_the_product_is_peft_s_own_delta_weight(layer: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), model)
    adapted = model[0]
    nn.init.normal_(adapted.lora_B["default"].weight)  # peft starts B at zero
    expected = adapted.get_delta_weight("default") / adapted.scaling["default"]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ((ka, kb),) = lora_layers(state).values()
    assert np.allclose(product(state[ka], state[kb]), expected.detach().numpy(), atol=1e-6)


def test_averaging_a_and_b_apart_errs_by_hand() -> None:
    layers = {"fc": ("fc.lora_A.default.weight", "fc.lora_B.default.weight")}
    one = {layers["fc"][0]: np.array([[1.0, 0.0]]), layers["fc"][1]: np.array([[1.0], [0.0]])}  # B·A = e1 e1^T
    two = {layers["fc"][0]: np.array([[0.0, 1.0]]), layers["fc"][1]: np.array([[0.0], [1.0]])}  # B·A = e2 e2^T
    # mean(B·A) = I/2; mean(B)·mean(A) = ones/4; the difference has norm 1/2, I/2 has norm 1/sqrt(2).
    assert merge_error([one, two], [1, 1], layers, {}) == {"fc": pytest.approx(2 ** -0.5)}
    # Weighted 3:1: mean(B·A) = diag(.75, .25), mean(B)·mean(A) = [.75 .25]^T [.75 .25].
    exact, merged = np.diag([0.75, 0.25]), np.outer([0.75, 0.25], [0.75, 0.25])
    want = np.linalg.norm(exact - merged) / np.linalg.norm(exact)
    assert merge_error([one, two], [30, 10], layers, {}) == {"fc": pytest.approx(want)}
    # One client alone, or every client with the same A (FFA-LoRA: A fixed, read from the server's copy): exact.
    assert merge_error([one], [1], layers, {}) == {"fc": 0.0}
    fixed = {layers["fc"][0]: np.array([[1.0, 2.0]])}
    b_only = [{layers["fc"][1]: np.array([[1.0], [3.0]])}, {layers["fc"][1]: np.array([[-2.0], [0.5]])}]
    assert merge_error(b_only, [2, 5], layers, fixed)["fc"] == pytest.approx(0.0, abs=1e-12)
    # B still at its zero start: nothing to merge, no error; a tensor in neither place: no value.
    zero = [{**one, layers["fc"][1]: np.zeros((2, 1))}, {**two, layers["fc"][1]: np.zeros((2, 1))}]
    assert merge_error(zero, [1, 1], layers, {}) == {"fc": 0.0}
    assert merge_error(b_only, [1, 1], layers, {}) == {}


def test_only_layers_with_both_halves_are_adapted_layers() -> None:
    keys = ["blocks.0.conv.lora_A.default.weight", "blocks.0.conv.lora_B.default.weight",
            "blocks.0.conv.base_layer.weight", "blocks.1.fc.lora_A.default.weight", "head.weight"]
    assert lora_layers(keys) == {"blocks.0.conv": ("blocks.0.conv.lora_A.default.weight",
                                                   "blocks.0.conv.lora_B.default.weight")}


@pytest.mark.parametrize(("mode", "personal", "fixed"), [("lora", "none", False), ("ffa-lora", "none", True),
                                                         ("lora", "fedsa-lora", None)])
def test_the_meter_reads_what_travels_and_the_fixed_a_and_skips_a_local_b(mode: str, personal: str,
                                                                         fixed: bool | None) -> None:
    from fedtl.personalisation import run_model
    from fedtl.strategies.lora import MergeMeter
    from tests.helpers import make_config

    model = run_model(make_config(f"finetune.mode={mode}", f"strategy.personalisation={personal}",
                                  "finetune.adapter-blocks=1"), load_weights=False)
    meter = MergeMeter(model.state_dict(), model.adapter_keys, model.local_keys)
    if fixed is None:  # FedSA-LoRA: B never reaches the server
        assert not meter and model.local_keys == {k for k in model.adapter_keys if ".lora_B." in k}
        return
    assert meter and set(meter.fixed) == ({a for a, _ in meter.layers.values()} if fixed else set())


@pytest.mark.parametrize("mode", ["ffa-lora", "full"])
def test_fedsa_lora_needs_an_a_that_trains(mode: str) -> None:
    from fedtl.errors import ConfigError
    from fedtl.personalisation import run_model
    from tests.helpers import make_config

    with pytest.raises(ConfigError, match='needs finetune.mode = "lora"'):
        run_model(make_config(f"finetune.mode={mode}", "strategy.personalisation=fedsa-lora"), load_weights=False)


def test_stacking_multiplies_out_to_the_weighted_mean_of_the_updates_at_any_ranks() -> None:
    from fedtl.strategies.lora import stack

    rng = np.random.default_rng(0)
    # Rank 1 and rank 3 clients of one 4 -> 5 Linear layer, weighted 1:3.
    pairs = [(rng.normal(size=(1, 4)), rng.normal(size=(5, 1))), (rng.normal(size=(3, 4)), rng.normal(size=(5, 3)))]
    a, b = stack(pairs, [10, 30])
    assert a.shape == (4, 4) and b.shape == (5, 4)
    np.testing.assert_allclose(b @ a, 0.25 * pairs[0][1] @ pairs[0][0] + 0.75 * pairs[1][1] @ pairs[1][0], atol=1e-12)


def _stacking(rank: int = 2):
    from fedtl.strategies.stacking import Stacking

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=4, target_modules=["0"]), model)
    trained = {k for k in model.state_dict() if ".lora_" in k}
    return Stacking(model.state_dict(), trained, (), scaling=4 / rank, seed=7), model.state_dict()


def test_a_fold_adds_the_scaled_mean_update_to_the_base_and_starts_fresh_adapters() -> None:
    from flwr.app import ArrayRecord

    stacking, state = _stacking()
    ka, kb, base_key = "0.lora_A.default.weight", "0.lora_B.default.weight", "0.base_layer.weight"
    rng = np.random.default_rng(1)
    updates = [{ka: rng.normal(size=(2, 4)).astype(np.float32), kb: rng.normal(size=(3, 2)).astype(np.float32)}
               for _ in range(3)]
    base = stacking.base_record(ArrayRecord())  # before any fold: the pre-trained weight
    np.testing.assert_array_equal(base[base_key].numpy(), state[base_key].numpy())
    out, errors = stacking.fold(1, ArrayRecord(), updates, [1, 2, 5], base)
    mean = sum(w * u[kb].astype(np.float64) @ u[ka] for w, u in zip([1 / 8, 2 / 8, 5 / 8], updates))
    np.testing.assert_allclose(out[base_key].numpy(), state[base_key].numpy() + 2.0 * mean, rtol=1e-5, atol=1e-6)
    assert errors["0"] < 1e-12  # exact up to float64 rounding
    assert not out[kb].numpy().any() and out[base_key].numpy().dtype == np.float32
    fresh = out[ka].numpy()
    assert fresh.shape == (2, 4) and not np.array_equal(fresh, state[ka].numpy())
    np.testing.assert_array_equal(fresh, stacking.fresh(2, "0"))  # round 2's A, from the seed: the same every run
    assert not np.array_equal(fresh, stacking.fresh(3, "0"))
    # The next round folds on top of this one's base.
    again, _ = stacking.fold(2, ArrayRecord(), updates, [1, 2, 5], stacking.base_record(out))
    np.testing.assert_allclose(again[base_key].numpy(), state[base_key].numpy() + 4.0 * mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("sets", "match"), [
    (["strategy.name=fedadam"], 'strategy.name = "fedadam" merges otherwise'),
    (["privacy.mode=client-level"], 'noise is added to A and B apart'),
])
def test_stacking_refuses_what_would_not_merge_the_product(sets: list[str], match: str) -> None:
    from fedtl.errors import ConfigError
    from tests.helpers import make_config

    with pytest.raises(ConfigError, match=match):
        make_config("finetune.mode=lora", "strategy.lora-merge=stack", *sets)


@pytest.mark.parametrize(("sets", "match"), [
    (["finetune.mode=ffa-lora"], "lora_A.default.weight does not travel"),
    (["finetune.mode=full"], "this model has no LoRA layer"),
])
def test_stacking_refuses_a_model_whose_adapters_do_not_all_travel(sets: list[str], match: str) -> None:
    from fedtl.errors import ConfigError
    from fedtl.server.app import check_server_config
    from tests.helpers import make_config

    with pytest.raises(ConfigError, match=match):
        check_server_config(make_config("strategy.lora-merge=stack", *sets))


A_KEY, B_KEY = "blocks.a.fc.lora_A.default.weight", "blocks.a.fc.lora_B.default.weight"


class RankedGrid:
    """Nodes that answer the query with their LoRA rank: node 1 at rank 1, the others at the server's 2."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        from flwr.app import Message, MetricRecord, RecordDict

        return [Message(RecordDict({"metrics": MetricRecord({"held-out": 0, "num-examples": 10,
                                                             "lora-rank": 1 if m.metadata.dst_node_id == 1 else 2})}),
                        reply_to=m) for m in messages]


def test_hetlora_cuts_what_each_node_is_sent_to_its_rank_and_zero_pads_its_reply(task_identity: None) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedtl.protocol import RoundPlan
    from fedtl.strategies.lora import Ranks
    from fedtl.strategies.registry import build_strategy
    from fedtl.strategies.roster import Roster
    from fedtl.strategies.transfer import LoraMerging, Records, Travel, transfer_strategy
    from tests.helpers import make_config

    initial = {A_KEY: torch.arange(6.0).reshape(2, 3), B_KEY: torch.zeros(2, 2)}
    observed: list = []
    s = transfer_strategy(build_strategy(make_config("clients=2")),
                          Travel(plan=lambda rnd: RoundPlan({"a": 0.1}, 1), keys_of=lambda units: [A_KEY, B_KEY],
                                 initial_state=initial, fingerprint="f00d"),
                          roster=Roster(timeout=5), records=Records(observer=observed.append),
                          lora=LoraMerging(ranks=Ranks(initial, set(initial))))
    sent = {m.metadata.dst_node_id: m for m in s.configure_train(1, ArrayRecord(initial), ConfigRecord(),
                                                                 RankedGrid([1, 2]))}
    cut = sent[1].content["arrays"]
    np.testing.assert_array_equal(cut[A_KEY].numpy(), [[0.0, 1.0, 2.0]])  # the first row of A ...
    assert cut[B_KEY].numpy().shape == (2, 1)  # ... and the first column of B
    assert sent[2].content["arrays"][A_KEY].numpy().shape == (2, 3)

    a1, b1 = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0], [2.0]])
    a2, b2 = np.array([[3.0, 4.0, 5.0], [6.0, 8.0, 10.0]]), np.array([[1.0, 3.0], [5.0, 7.0]])

    def reply(to: Message, a: np.ndarray, b: np.ndarray) -> Message:
        arrays = ArrayRecord({A_KEY: torch.as_tensor(a, dtype=torch.float32), B_KEY: torch.as_tensor(b, dtype=torch.float32)})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})}), reply_to=to)

    replies = [reply(sent[1], a1, b1), reply(sent[2], a2, b2)]
    up = sum(r.content["arrays"].count_bytes() for r in replies)
    arrays, _ = s.aggregate_train(1, replies)
    # Zero-padded to rank 2, then FedAvg's mean (equal weights): row 2 of A and column 2 of B halve.
    np.testing.assert_allclose(arrays[A_KEY].numpy(), [[2.0, 3.0, 4.0], [3.0, 4.0, 5.0]])
    np.testing.assert_allclose(arrays[B_KEY].numpy(), [[1.0, 1.5], [3.5, 3.5]])
    (report,) = observed
    assert report.totals["bytes_up"] == up  # what came, not the padded copies
    assert report.totals["bytes_down"] < 2 * ArrayRecord(initial).count_bytes()  # node 1 was sent less
    assert report.totals["clients_ok"] == 2 and report.merge_error == {}  # no meter given here

    # A node that replies at another rank than it was sent is refused, like any other wrong shape.
    sent = {m.metadata.dst_node_id: m for m in s.configure_train(2, arrays, ConfigRecord(), RankedGrid([1, 2]))}
    s.aggregate_train(2, [reply(sent[1], a2, b2), reply(sent[2], a2, b2)])
    assert observed[-1].totals["clients_ok"] == 1 and "is float32[2, 3], expected float32[1, 3]" in observed[-1].problems[0]


def test_a_rank_schedule_cycles_by_partition_and_is_checked_when_read() -> None:
    from fedtl.clients.ranks import at_node_rank
    from fedtl.errors import ConfigError
    from tests.helpers import make_config

    cfg = make_config("finetune.mode=lora", "strategy.lora-merge=hetlora", "finetune.lora-rank=8",
                      "finetune.lora-alpha=16", "finetune.lora-ranks=2, 4,8")
    assert [cfg.finetune.rank_of(p) for p in range(4)] == [2, 4, 8, 2]
    mine = at_node_rank(cfg, {"partition-id": 0}).finetune
    assert (mine.lora_rank, mine.lora_alpha) == (2, 4.0)  # alpha scaled along: alpha / r = 2 at every rank
    assert at_node_rank(cfg, {"partition-id": 3, "lora-rank": 8}) == cfg  # the node config wins
    with pytest.raises(ConfigError, match="not from 1 to the run's finetune.lora-rank = 8"):
        at_node_rank(cfg, {"lora-rank": 16})
    with pytest.raises(ConfigError, match="'16' is not a rank from 1 to finetune.lora-rank = 8"):
        make_config("finetune.lora-rank=8", "finetune.lora-ranks=2,16")
    with pytest.raises(ConfigError, match='use "hetlora"'):
        make_config("finetune.mode=lora", "finetune.lora-rank=8", "finetune.lora-ranks=2,8")
    one = make_config("finetune.mode=lora")
    with pytest.raises(ConfigError, match='"average" merges one rank only'):
        at_node_rank(one, {"lora-rank": 2})


def test_the_scratch_baseline_of_a_lora_merge_trains_without_lora() -> None:
    from tests.helpers import make_config

    fedsa = make_config("finetune.mode=lora", "strategy.personalisation=fedsa-lora").as_scratch()
    assert (fedsa.finetune.mode, fedsa.strategy.personalisation) == ("full", "none")
    het = make_config("finetune.mode=lora", "strategy.lora-merge=hetlora", "finetune.lora-rank=8",
                      "finetune.lora-ranks=2,8").as_scratch()
    assert (het.strategy.lora_merge, het.finetune.lora_ranks) == ("average", "")
    fedper = make_config("finetune.mode=full", "strategy.personalisation=fedper").as_scratch()
    assert fedper.strategy.personalisation == "fedper"  # a personalisation of other tensors stays


def test_the_meter_weights_the_replies_as_the_strategy_does(task_identity: None) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedtl.protocol import RoundPlan
    from fedtl.strategies.lora import MergeMeter
    from fedtl.strategies.registry import build_strategy
    from fedtl.strategies.transfer import LoraMerging, Records, Travel, transfer_strategy
    from tests.helpers import StaticGrid, make_config

    initial = {A_KEY: torch.zeros(1, 2), B_KEY: torch.zeros(2, 1)}
    pairs = [(np.array([[1.0, 0.0]]), np.array([[1.0], [0.0]])), (np.array([[0.0, 1.0]]), np.array([[0.0], [1.0]]))]
    layers = {"blocks.a.fc": (A_KEY, B_KEY)}
    for weighting, key, weights in (("examples", "num-examples", [10, 30]), ("uniform", "unit-weight", [1, 1])):
        observed: list = []
        cfg = make_config("clients=2", f"strategy.weighting={weighting}")
        s = transfer_strategy(build_strategy(cfg), Travel(plan=lambda rnd: RoundPlan({"a": 0.1}, 1),
                                                          keys_of=lambda units: [A_KEY, B_KEY], initial_state=initial,
                                                          fingerprint="f00d"),
                              records=Records(observer=observed.append),
                              lora=LoraMerging(meter=MergeMeter(initial, set(initial)), weight_key=key))
        sent = list(s.configure_train(1, ArrayRecord(initial), ConfigRecord(), StaticGrid([1, 2])))
        replies = [Message(RecordDict({"arrays": ArrayRecord({A_KEY: torch.as_tensor(a, dtype=torch.float32),
                                                               B_KEY: torch.as_tensor(b, dtype=torch.float32)}),
                                       "metrics": MetricRecord({"num-examples": n, "unit-weight": 1})}), reply_to=m)
                   for m, (a, b), n in zip(sent, pairs, [10, 30])]
        s.aggregate_train(1, replies)
        expected = merge_error([{A_KEY: a, B_KEY: b} for a, b in pairs], weights, layers, {})
        assert observed[0].merge_error == pytest.approx(expected), weighting
    assert merge_error([{A_KEY: a, B_KEY: b} for a, b in pairs], [10, 30], layers, {}) != pytest.approx(expected)
