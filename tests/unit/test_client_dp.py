"""Client-level DP: Flower's wrappers inside the transfer strategy, on hand-made updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
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
    # With 2 clients the clipped count's noise (2 / 20) must exceed the multiplier.
    for sigma in (1.0, 0.1):
        cfg = _cfg("privacy.clipping=adaptive", f"noise-multiplier={sigma}")
        with pytest.raises(ConfigError, match="adaptive-server.*must be below the clipped count's noise \\(0.1"):
            wrap_client_level(build_strategy(cfg), cfg)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "qfedavg", "fedmedian",
                                  "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_client_level_dp_refuses_strategies_whose_aggregate_is_not_the_mean(name: str) -> None:
    # An audit found (noise off, one client's update changed): the released model moved 10.7x the C/m the
    # noise is scaled to under FedAdam, 14.3x FedYogi, 40x FedAdagrad, 7.1x Krum.
    for clipping in ("fixed", "adaptive"):
        with pytest.raises(ConfigError, match=f"strategy.name = \"{name}\" with privacy.mode = \"client-level\": "
                                              "the noise is scaled to the plain mean"):
            make_config("clients=12", "privacy.mode=client-level", f"privacy.clipping={clipping}",
                        f"strategy.name={name}")
    make_config("clients=12", f"strategy.name={name}")  # fine without client-level DP


def test_fedavg_and_fedprox_run_under_client_level_dp() -> None:
    from flwr.serverapp import RdpAccountant
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, FedProx

    for name, cls in (("fedavg", FedAvg), ("fedprox", FedProx)):
        cfg = make_config("clients=2", "privacy.mode=client-level", f"strategy.name={name}")
        wrapped, accountant = wrap_client_level(build_strategy(cfg), cfg)
        # Flower's fixed server-side clipping around the named strategy, at the config's noise and clip.
        assert isinstance(wrapped, DifferentialPrivacyServerSideFixedClipping)
        assert type(wrapped.strategy) is cls
        assert wrapped.noise_multiplier == cfg.privacy.noise_multiplier
        assert wrapped.clipping_norm == cfg.privacy.max_grad_norm
        assert isinstance(accountant, RdpAccountant)


def _clip_round(inner, sent: np.ndarray, update: float, rnd: int) -> np.ndarray:
    """One round of Flower's wrapper ``inner`` on 2 nodes whose updates are ``update`` in every entry."""
    out = list(inner.configure_train(rnd, ArrayRecord({"w": Array(sent)}), ConfigRecord(), StaticGrid([1, 2])))
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": Array(sent + np.float32(update))}),
                                   "metrics": MetricRecord({"num-examples": 5, "unit-weight": 1})}), reply_to=m)
               for m in out]
    arrays, _ = inner.aggregate_train(rnd, replies)
    return arrays["w"].numpy()


def test_adaptive_clipping_noises_with_the_norm_it_clipped_with_and_moves_it_toward_the_quantile(
        task_identity: None) -> None:
    # sigma 0.05 with sigma_b = 2 / 20 = 0.1: the update's share is (0.05^-2 - 0.1^-2)^-1/2 = 1/sqrt(300).
    cfg = _cfg("privacy.clipping=adaptive", "privacy.clip-on=server", "noise-multiplier=0.05", "privacy.clip-lr=2.0",
               "privacy.max-grad-norm=1.0")
    inner, accountant = wrap_client_level(build_strategy(cfg), cfg)
    assert inner.noise_multiplier == pytest.approx(300**-0.5)
    sent = np.zeros((200, 200), np.float32)
    # Round 1: both updates (norm 200) are clipped to 1, i.e. 1/200 an entry; nearly none stays unclipped,
    # so C grows by about exp(2 * 0.5). Flower 1.42 shrank it (exp(-2 * 0.5)) and noised with that.
    merged = _clip_round(inner, sent, 1.0, 1)
    noise = merged - 1.0 / 200
    assert noise.mean() == pytest.approx(0.0, abs=1e-3)
    assert noise.std() == pytest.approx(300**-0.5 * 1.0 / 2, rel=0.02)  # the norm the updates were clipped with
    grown = inner.clipping_norm
    assert 2.0 < grown < 3.7  # exp(2 * (0.5 - noisy unclipped fraction)), that fraction ~ N(0, 0.05)
    # Round 2: tiny updates (norm 0.2), all unclipped: C shrinks, and the noise is at the grown norm.
    merged = _clip_round(inner, sent, 0.001, 2)
    assert (merged - 0.001).std() == pytest.approx(300**-0.5 * grown / 2, rel=0.02)
    assert inner.clipping_norm < grown
    # Update and count together: one release at the configured multiplier, as accounted.
    assert (inner.noise_multiplier**-2 + 0.1**-2) ** -0.5 == pytest.approx(0.05)
    assert accountant.get_epsilon(1e-5) == pytest.approx(
        client_level_epsilon(0.05, releases=2, sampled=2, population=2, delta=1e-5))


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


def test_client_level_noise_is_drawn_from_fresh_entropy_not_the_seed() -> None:
    # Flower's wrappers noise with numpy's global state; seeded from the config's seed (config.toml, which
    # anyone holding the released models can read), the noise could be regenerated and subtracted.
    import random

    from fedtl.server.app import seed_random

    def draws(cfg) -> tuple[list[float], list[float]]:
        seed_random(cfg)
        return [random.random() for _ in range(3)], list(np.random.normal(size=3))

    private, plain = _cfg(), make_config("clients=2")
    (sampling_a, noise_a), (sampling_b, noise_b) = draws(private), draws(private)
    assert sampling_a == sampling_b and noise_a != noise_b  # nodes sampled as the seed says; fresh noise
    assert draws(plain) == draws(plain)  # without DP noise the whole run repeats
