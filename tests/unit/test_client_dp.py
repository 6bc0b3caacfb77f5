"""Client-level DP: Flower's wrappers inside TransferStrategy, on hand-made updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedtl.accounting import client_level_epsilon
from fedtl.clients.app import make_client_app
from fedtl.config import ConfigError
from fedtl.models.factory import build_model
from fedtl.strategies.client_dp import CLIENT_DP, wrap_client_level
from fedtl.strategies.registry import build_strategy
from tests.helpers import StaticGrid, configure_round_one, make_config, node_context, strategy, train_instruction


def _cfg(*sets: str):
    return make_config("clients=2", "privacy.mode=client-level", *sets)


def _reply(to: Message, head_w: float) -> Message:
    arrays = {"head.w": torch.full((2, 2), head_w), "head.b": torch.zeros(2)}
    metrics = MetricRecord({"num-examples": 10 if head_w > 1 else 90, "unit-weight": 1, "train-loss": 0.0})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=to)


def test_server_side_clipping_bounds_each_update_and_weights_clients_equally(task_identity: None) -> None:
    cfg = _cfg("privacy.clipping=fixed", "privacy.clip-on=server", "noise-multiplier=0.001")
    inner, accountant = wrap_client_level(build_strategy(cfg), cfg)
    s = strategy(inner=inner)
    out = configure_round_one(s, [1, 2])
    arrays, _ = s.aggregate_train(1, [_reply(out[0], 3.0), _reply(out[1], 0.1)])
    # Update norms: 6 (clipped to 1, so 3.0 -> 0.5) and 0.2 (kept); the mean is unweighted
    # although the clients hold 10 and 90 examples. Noise std: 0.001 * 1 / 2.
    np.testing.assert_allclose(arrays["head.w"].numpy(), np.full((2, 2), 0.3), atol=5e-3)
    assert accountant.num_releases == 1
    expected = client_level_epsilon(0.001, releases=1, sampled=2, population=2, delta=1e-5)
    assert accountant.get_epsilon(1e-5) == pytest.approx(expected)


def test_a_round_missing_an_update_releases_nothing(task_identity: None) -> None:
    for clipping in ("fixed", "adaptive"):
        cfg = _cfg(f"privacy.clipping={clipping}", "noise-multiplier=0.05")
        inner, accountant = wrap_client_level(build_strategy(cfg), cfg)
        s = strategy(inner=inner)
        out = configure_round_one(s, [1, 2])
        arrays, _ = s.aggregate_train(1, [_reply(out[0], 0.1)])  # the other node timed out
        assert arrays is None and accountant.num_releases == 0, clipping


def test_adaptive_clipping_is_accounted_and_budgeted(task_identity: None) -> None:
    one = client_level_epsilon(0.05, releases=1, sampled=2, population=2, delta=1e-5)
    cfg = _cfg("privacy.clipping=adaptive", "noise-multiplier=0.05", f"max-epsilon={one * 1.2}")
    inner, accountant = wrap_client_level(build_strategy(cfg), cfg)
    s = strategy(inner=inner)
    out = configure_round_one(s, [1, 2])
    arrays, _ = s.aggregate_train(1, [_reply(m, 0.1) for m in out])
    assert arrays is not None and accountant.get_epsilon(1e-5) == pytest.approx(one)
    with pytest.raises(PrivacyBudgetExhausted, match="exceed max_epsilon"):
        s.configure_train(2, arrays, ConfigRecord(), StaticGrid([1, 2]))


def test_client_side_clipping_runs_flowers_mod_in_the_client_app(task_identity: None) -> None:
    cfg = make_config("clients=5", "privacy.mode=client-level", "privacy.clip-on=client")
    msg = train_instruction(cfg, build_model(cfg).backbone_fingerprint)
    msg.content["config"][KEY_CLIPPING_NORM] = 0.01  # what Flower's client-side wrapper sends
    sent = msg.content["arrays"].to_numpy_ndarrays()
    reply = make_client_app(cfg.to_run_config())(msg, node_context())
    back = reply.content["arrays"].to_numpy_ndarrays()
    norm = np.sqrt(sum(float(((b - a) ** 2).sum()) for a, b in zip(sent, back, strict=True)))
    assert norm == pytest.approx(0.01, rel=1e-4)  # trained further, then clipped to the norm


def test_client_side_clipping_leaves_evaluation_and_queries_alone(task_identity: None) -> None:
    cfg = make_config("clients=5", "privacy.mode=client-level", "privacy.clip-on=client")
    app = make_client_app(cfg.to_run_config())
    instruction = train_instruction(cfg, build_model(cfg).backbone_fingerprint)
    for message_type in ("evaluate", "query"):
        msg = Message(instruction.content, dst_node_id=1, message_type=message_type)
        reply = app(msg, node_context())
        assert not reply.has_error(), (message_type, reply.error.reason if reply.has_error() else "")
        assert reply.content["metrics"]["partition-id"] == 2


def test_every_wrapper_is_registered_and_bad_settings_are_config_errors() -> None:
    assert set(CLIENT_DP.names()) == {"fixed-server", "fixed-client", "adaptive-server", "adaptive-client"}
    with pytest.raises(ConfigError, match="client-level DP calibrates its noise to equal client weights"):
        _cfg("strategy.weighting=examples")
    # Flower: with 2 clients the clipped-count noise (2 / 20) cannot carry multiplier 1.
    cfg = _cfg("privacy.clipping=adaptive", "noise-multiplier=1.0")
    with pytest.raises(ConfigError, match="client-level DP \\(adaptive-server\\).*clipped_count_stddev"):
        wrap_client_level(build_strategy(cfg), cfg)


def test_a_round_the_dp_wrapper_does_not_release_counts_nothing_as_merged(task_identity: None,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    # Its noise is calibrated to every sampled update: with one missing, Flower's wrapper releases nothing.
    cfg = make_config("clients=3", "privacy.mode=client-level", "noise-multiplier=0.3")
    inner, accountant = wrap_client_level(build_strategy(cfg), cfg)
    observed: list = []
    s = strategy(observed, inner=inner)
    out = configure_round_one(s, [1, 2, 3])
    arrays, _ = s.aggregate_train(1, [_reply(out[0], 0.1), _reply(out[1], 0.2)])  # the third timed out
    assert arrays is None and accountant.num_releases == 0
    (rnd, totals), = observed
    assert totals["clients_ok"] == 0 and totals["clients_failed"] == 3  # before: clients_ok said 2
    assert "round 1 merged nothing" in caplog.text
