"""Accounting against known values and against Opacus's and Flower's own accountants."""

from __future__ import annotations

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from fedtl.accounting import (
    calibrate_client_noise,
    calibrate_sample_noise,
    client_level_epsilon,
    compose,
    poisson_schedule,
    sample_epsilon,
)


def test_golden_value_opacus_tests_against() -> None:
    # Opacus's own test: RDP, sigma 1.5, q 0.04, 2250 steps, delta 1e-5.
    assert sample_epsilon([(1.5, 0.04, 2250)], accountant="rdp", delta=1e-5) == pytest.approx(7.32911, abs=1e-5)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_no_steps_spend_nothing_under_every_accountant(accountant: str) -> None:
    # A client that declined its first round holds (sigma, q, 0): Opacus's PRV divides by the step count.
    assert sample_epsilon([(1.0, 0.2, 0)], accountant=accountant, delta=1e-5) == 0.0
    alone = sample_epsilon([(1.0, 0.2, 10)], accountant=accountant, delta=1e-5)
    assert sample_epsilon([(1.0, 0.2, 0), (1.0, 0.2, 10)], accountant=accountant, delta=1e-5) == alone


def test_a_run_spends_far_more_than_one_round() -> None:
    # The example: sigma 1, q 16/72, 10 steps a round, 20 rounds.
    one_round = sample_epsilon([(1.0, 16 / 72, 10)], accountant="rdp", delta=1e-5)
    history: list = []
    for _ in range(20):
        history = compose(history, 1.0, 16 / 72, 10)
    assert history == [(1.0, 16 / 72, 200)]  # merged as Opacus merges
    assert one_round == pytest.approx(6.2, abs=0.05)
    assert sample_epsilon(history, accountant="rdp", delta=1e-5) == pytest.approx(26.4, abs=0.05)


@pytest.mark.parametrize(("n", "batch"), [(7, 16), (63, 16), (93, 1), (99, 1), (200, 3)])
def test_poisson_schedule_is_what_opacus_runs_and_accounts(n: int, batch: int) -> None:
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch))
    rate, steps = poisson_schedule(n, batch)
    assert steps == len(loader) == loader.batch_sampler.steps  # steps an epoch
    assert rate == 1 / len(loader)  # the rate make_private steps its accountant at


def test_poisson_schedule_drops_a_step_where_opacus_does() -> None:
    # ceil(93 / 1) = 93 batches, but Opacus's sampler runs int(1 / (1 / 93)) = 92 steps.
    assert poisson_schedule(93, 1) == (1 / 92, 92)
    with pytest.raises(ValueError, match="at least one example"):
        poisson_schedule(0, 4)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_calibration_spends_at_most_the_target(accountant: str) -> None:
    sigma = calibrate_sample_noise(3.0, delta=1e-5, sample_rate=0.25, steps=120, accountant=accountant)
    eps = sample_epsilon([(sigma, 0.25, 120)], accountant=accountant, delta=1e-5)
    assert 3.0 - 0.02 < eps <= 3.0


def test_rdp_history_equals_one_opacus_accountant_stepped_throughout() -> None:
    acc = RDPAccountant()
    for _ in range(37):
        acc.step(noise_multiplier=1.1, sample_rate=0.1)
    for _ in range(5):
        acc.step(noise_multiplier=0.9, sample_rate=0.1)
    ours = compose(compose([], 1.1, 0.1, 37), 0.9, 0.1, 5)
    assert ours == acc.history
    assert sample_epsilon(ours, accountant="rdp", delta=1e-6) == acc.get_epsilon(1e-6)


def test_client_level_calibration() -> None:
    sigma = calibrate_client_noise(8.0, releases=20, sampled=10, population=10, delta=1e-5)
    eps = client_level_epsilon(sigma, releases=20, sampled=10, population=10, delta=1e-5)
    assert 8.0 - 0.02 < eps <= 8.0
    # Without amplification a Gaussian release's RDP is alpha / (2 sigma^2): doubling sigma
    # divides the RDP curve by four, so epsilon falls well below half.
    assert client_level_epsilon(2 * sigma, releases=20, sampled=10, population=10, delta=1e-5) < eps / 2
