"""Every registered Flower strategy inside the transfer strategy, on hand-made arrays; growing key sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtl.clients.trainer import train_local
from fedtl.config import ConfigError
from fedtl.data.federated import LabelledImages
from fedtl.models.backbones import build_backbone
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from fedtl.strategies.registry import STRATEGIES, build_strategy
from tests.helpers import INITIAL, StaticGrid, keys_of, make_config, plan, strategy

NODES = [1, 2, 3, 4, 5]


def _replies(messages: list[Message], updates: list[dict[str, np.ndarray]]) -> list[Message]:
    return [Message(RecordDict({"arrays": ArrayRecord({k: torch.as_tensor(v) for k, v in u.items()}),
                                "metrics": MetricRecord({"num-examples": 10, "train-loss": 1.0 + i, "unit-weight": 1})}),
                    reply_to=m) for i, (m, u) in enumerate(zip(messages, updates))]


def _round(s, rnd: int, arrays: ArrayRecord, shift: float) -> tuple[ArrayRecord, list[dict[str, np.ndarray]]]:
    out = sorted(s.configure_train(rnd, arrays, ConfigRecord(), StaticGrid(NODES)), key=lambda m: m.metadata.dst_node_id)
    sent = out[0].content["arrays"]
    updates = [{k: sent[k].numpy() + shift * (i + 1) for k in sent.keys()} for i in range(len(out))]
    merged, _ = s.aggregate_train(rnd, _replies(out, updates))
    return merged, updates


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_strategy_merges_only_travelling_keys_as_the_set_grows(name: str, task_identity: None) -> None:
    s = strategy(inner=build_strategy(make_config(f"strategy.name={name}", "clients=5")))
    arrays = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    for rnd in (1, 2, 3):  # round 1: the head; from round 2 block a joins
        arrays, _ = _round(s, rnd, arrays, shift=0.1)
        assert set(arrays.keys()) == set(keys_of(plan(rnd).lrs)), name
        assert all(np.isfinite(a.numpy()).all() for a in arrays.values()), name
        assert {a.dtype for a in arrays.values()} == {"float32"}, name  # as sent, whatever the server computes in


def test_median_and_trimmed_mean_by_hand(task_identity: None) -> None:
    head = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    for name, expected in (("fedmedian", 0.3), ("fedtrimmedavg", (0.2 + 0.3 + 0.4) / 3)):
        s = strategy(inner=build_strategy(make_config(f"strategy.name={name}", "clients=5")))
        merged, _ = _round(s, 1, head, shift=0.1)  # updates 0.1 .. 0.5 above zero
        np.testing.assert_allclose(merged["head.b"].numpy(), expected, rtol=1e-6, err_msg=name)


def test_fedadam_keeps_old_moments_and_starts_new_keys_fresh(task_identity: None) -> None:
    cfg = make_config("strategy.name=fedadam", "clients=5", "strategy.server-lr=0.1")
    inner = build_strategy(cfg)
    s = strategy(inner=inner)
    b1, b2, eta, tau = 0.9, 0.99, 0.1, 1e-3
    arrays = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    def eta_norm(t: int) -> float:  # Flower's bias-corrected step size, by server round
        return eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))

    merged1, _ = _round(s, 1, arrays, shift=0.1)  # mean update 0.3 on every head entry
    m1, v1 = (1 - b1) * 0.3, (1 - b2) * 0.09
    np.testing.assert_allclose(merged1["head.b"].numpy(), eta_norm(1) * m1 / (np.sqrt(v1) + tau), rtol=1e-5)
    merged2, _ = _round(s, 2, merged1, shift=0.1)  # block a joins at its pre-trained 7.0
    np.testing.assert_allclose(inner.m_t["head.b"], b1 * m1 + (1 - b1) * 0.3, rtol=1e-5)  # kept and continued
    np.testing.assert_allclose(inner.m_t["blocks.a.w"], (1 - b1) * 0.3, rtol=1e-5)  # fresh
    np.testing.assert_allclose(inner.v_t["blocks.a.w"], (1 - b2) * 0.09, rtol=1e-5)
    fresh = eta_norm(2) * (1 - b1) * 0.3 / (np.sqrt((1 - b2) * 0.09) + tau)
    np.testing.assert_allclose(merged2["blocks.a.w"].numpy(), 7.0 + fresh, rtol=1e-5)


def test_fedavgm_momentum_grows_with_the_keys(task_identity: None) -> None:
    cfg = make_config("strategy.name=fedavgm", "clients=5", "strategy.server-momentum=0.5")
    s = strategy(inner=build_strategy(cfg))
    merged1, _ = _round(s, 1, ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])}), shift=0.1)
    np.testing.assert_allclose(merged1["head.b"].numpy(), 0.3, rtol=1e-5)  # lr 1, first momentum = the update
    merged2, _ = _round(s, 2, merged1, shift=0.1)
    np.testing.assert_allclose(merged2["head.b"].numpy(), 0.3 + 0.5 * 0.3 + 0.3, rtol=1e-5)
    np.testing.assert_allclose(merged2["blocks.a.w"].numpy(), 7.0 + 0.3, rtol=1e-5)  # no momentum yet


def test_fedprox_pulls_local_training_towards_the_global_model() -> None:
    torch.manual_seed(0)
    data = LabelledImages(torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)), ("clean",) * 16)
    start = TransferModel(build_backbone("small-cnn", 1), 10)
    drift = {}
    for mu in (0.0, 5.0):
        model = TransferModel(build_backbone("small-cnn", 1), 10)
        model.load_state_dict(start.state_dict())
        train_local(model, data, RoundPlan({"head": 0.05}, 20, proximal_mu=mu), make_config().finetune, seed=0)
        drift[mu] = float((model.head.weight - start.head.weight).detach().norm())
    assert drift[5.0] < 0.5 * drift[0.0]
    assert RoundPlan.from_config({**RoundPlan({"head": 0.5}, 3).to_config(), "proximal-mu": 0.2}).proximal_mu == 0.2
    with pytest.raises(ConfigError, match="proximal term would be silently dropped"):
        make_config("strategy.name=fedprox", "privacy.mode=dp-sgd")


def test_fedprox_messages_carry_mu_into_the_clients_plan(task_identity: None) -> None:
    s = strategy(inner=build_strategy(make_config("strategy.name=fedprox", "strategy.proximal-mu=0.3", "clients=5")))
    out = list(s.configure_train(1, ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])}), ConfigRecord(),
                                 StaticGrid(NODES)))
    assert {RoundPlan.from_config(m.content["config"]).proximal_mu for m in out} == {0.3}


def test_server_optimisers_average_normalisation_statistics_instead_of_stepping_them(task_identity: None) -> None:
    from fedtl.protocol import RoundPlan
    from fedtl.strategies.registry import steps_server_optimiser
    from fedtl.strategies.transfer import Travel, transfer_strategy

    initial = {"blocks.a.bn.running_var": torch.full((2,), 0.01), "head.w": torch.zeros(2)}
    inner = build_strategy(make_config("strategy.name=fedadam", "clients=5"))
    assert steps_server_optimiser(inner) and not steps_server_optimiser(build_strategy(make_config("clients=5")))
    s = transfer_strategy(inner, Travel(plan=lambda r: RoundPlan({"a": 0.1, "head": 0.1}, 1),
                                        keys_of=lambda units: list(initial), initial_state=initial, fingerprint="f"),
                          statistics_by_mean="num-examples")
    out = sorted(s.configure_train(1, ArrayRecord(), ConfigRecord(), StaticGrid(NODES)),
                 key=lambda m: m.metadata.dst_node_id)
    # Variances shrink on every client: FedAdam's step (server lr 0.1 on a normalised update)
    # would take 0.01 below zero; their mean cannot.
    updates = [{"blocks.a.bn.running_var": np.full(2, 0.001 * (i + 1), np.float32),
                "head.w": np.full(2, 0.1 * (i + 1), np.float32)} for i in range(5)]
    merged, _ = s.aggregate_train(1, _replies(out, updates))
    np.testing.assert_allclose(merged["blocks.a.bn.running_var"].numpy(), 0.003, rtol=1e-6)
    assert not np.allclose(merged["head.w"].numpy(), 0.3)  # the parameters still take FedAdam's step


@pytest.mark.parametrize(("sets", "problem"), [
    (("strategy.name=bulyan", "clients=6", "strategy.num-malicious-nodes=1"), "needs at least 7 clients per round"),
    (("strategy.name=krum", "clients=4", "strategy.num-malicious-nodes=1"), "needs at least 5 clients per round"),
    (("strategy.name=bulyan", "clients=10", "strategy.num-malicious-nodes=1", "strategy.fraction-train=0.5",
      "strategy.min-train-nodes=2"), "a round samples 5"),
    (("strategy.name=multikrum", "clients=5", "strategy.num-nodes-to-select=5", "strategy.num-malicious-nodes=1"),
     "exceeds the 4 updates MultiKrum may select"),
])
def test_robust_rules_that_could_never_merge_are_refused_before_round_one(sets: tuple[str, ...], problem: str) -> None:
    # Before: Bulyan short of 4f + 3 replies skipped every aggregation, and the run looked successful.
    with pytest.raises(ConfigError, match=problem):
        make_config(*sets)
    make_config(*sets[:2])  # with no malicious nodes assumed, the same clients suffice


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_a_strategy_rebuilt_from_its_saved_state_merges_round_3_as_the_original(name: str,
                                                                               task_identity: None) -> None:
    # What a resumed run does: a fresh strategy from the config, its carried state (moments, momentum) put back.
    from fedtl.strategies.state import load_strategy_state, strategy_state

    cfg = make_config(f"strategy.name={name}", "clients=5")
    inner = build_strategy(cfg)
    s = strategy(inner=inner)
    arrays = ArrayRecord({k: INITIAL[k] for k in keys_of(["head"])})
    for rnd in (1, 2):
        arrays, _ = _round(s, rnd, arrays, shift=0.1)
    carried, values = strategy_state(inner)
    fresh_inner = build_strategy(cfg)
    fresh = strategy(inner=fresh_inner)
    load_strategy_state(fresh_inner, {k: v.copy() for k, v in carried.items()}, json.loads(json.dumps(values)))
    original, _ = _round(s, 3, arrays, shift=0.1)
    restored, _ = _round(fresh, 3, arrays, shift=0.1)
    for key in original.keys():
        np.testing.assert_array_equal(original[key].numpy(), restored[key].numpy(), err_msg=f"{name} {key}")
    if name in ("fedadam", "fedavgm"):
        assert carried  # they carry state; a fresh one alone would step differently
