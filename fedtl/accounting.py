"""Privacy accounting for whole runs: Opacus accountants per client, Flower's for client-level DP.

Sample-level (DP-SGD): a client's spend is one Opacus accountant's over *every* step
it took in the run. The accountant's state is its history of ``(noise multiplier,
sample rate, steps)``, which the client keeps between rounds; a fresh accountant per
round would report one round's epsilon, not the run's.

Client-level: one Flower ``RdpAccountant`` on the server composes a Gaussian release
per aggregated round (no sampling amplification: Flower samples a fixed number of
clients, not by Poisson sampling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flwr.serverapp import RdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from fedtl.config import ExperimentConfig, FinetuneConfig
from fedtl.config import PrivacyConfig as PrivacySection  # Flower's PrivacyConfig (above) is its accountant's
from fedtl.config.rules import GDP_MIN_NOISE
from fedtl.errors import AccountantError

History = list[tuple[float, float, int]]
"""An Opacus accountant's history: ``(noise multiplier, sample rate, steps)`` per stretch."""


# -- sample level (DP-SGD) -------------------------------------------------------------
def poisson_schedule(num_examples: int, batch_size: int) -> tuple[float, int]:
    """The sample rate Opacus accounts and the steps per epoch of its Poisson sampling over ``num_examples``.

    Mirrors ``DPDataLoader.from_data_loader`` and ``make_private``: the loader draws with
    ``q0 = 1 / ceil(n / batch)`` for ``int(1 / q0)`` steps an epoch, and the accountant is
    stepped at ``1 / int(1 / q0)`` (equal to ``q0`` unless float rounding drops a step,
    as for 93 batches: then the accounted rate is the larger, which is conservative).
    """
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one example")
    steps = int(1 / (1 / math.ceil(num_examples / batch_size)))
    return 1 / steps, steps


def compose(history: Sequence[tuple[float, float, int]], sigma: float, q: float, steps: int) -> History:
    """``history`` followed by ``steps`` steps at ``(sigma, q)``, merged as Opacus's accountants merge."""
    out = [(float(s), float(r), int(n)) for s, r, n in history]
    if steps <= 0:
        return out
    if out and out[-1][:2] == (sigma, q):
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append((float(sigma), float(q), int(steps)))
    return out


# Where an accountant cannot state epsilon here (measured on the 2-core, 24 GiB machine). Opacus's GDP: below
# fedtl.config.rules.GDP_MIN_NOISE (the config refuses it). Opacus's PRV and dp-accounting's PLD discretise a
# privacy-loss range that grows as 1/σ² (PRV at σ = 1e-3, q = 0.2, 10 steps asked for 83.8 GiB; PLD at σ = 0.05,
# q = 0.2, 2,000 steps took 22 s and 4.3 GB). RDP states any σ > 0 in milliseconds.
PLD_MIN_NOISE = 0.3
# PRV's grid: 1.7e7 points (σ = 0.5, q = 0.2, 2,000 steps) took 15 s and 3.4 GB; 1.6e6 points 0.4 s.
PRV_MAX_POINTS = 4_000_000


def _prv_points(history: Sequence[tuple[float, float, int]], delta: float) -> int:
    """The size of the grid Opacus's PRV accountant would discretise ``history`` on (``PRVAccountant.get_epsilon``'s
    own domain, with its default errors), computed without allocating it."""
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    domain = PRVAccountant()._get_domain(  # noqa: SLF001 - the domain PRV itself would use, before it allocates
        prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
        num_self_compositions=[n for _, _, n in history], eps_error=0.01, delta_error=delta / 1000)
    return int(domain.size)


def check_evaluable(history: Sequence[tuple[float, float, int]], *, accountant: str, delta: float) -> None:
    """Raise ``AccountantError`` (naming the fix) if Opacus's ``accountant`` cannot state ``history``'s epsilon here.

    Raises
    ------
    AccountantError
        GDP below ``GDP_MIN_NOISE``; PRV on a grid above ``PRV_MAX_POINTS``.
    """
    sigma = min((s for s, _, n in history if n > 0), default=math.inf)
    if accountant == "gdp" and sigma < GDP_MIN_NOISE:
        raise AccountantError(f"Opacus's GDP accountant cannot state epsilon at noise multiplier {sigma:g} (below "
                              f"{GDP_MIN_NOISE:g} its formula overflows): set privacy.accountant = \"rdp\"")
    if accountant == "prv" and math.isfinite(sigma):
        points = _prv_points([h for h in history if h[2] > 0], delta)
        if points > PRV_MAX_POINTS:
            raise AccountantError(
                f"Opacus's PRV accountant would discretise these steps (smallest noise multiplier {sigma:g}) on "
                f"{points:.3g} points ({points * 8 / 2**30:.3g} GiB an array), past the {PRV_MAX_POINTS:.0e} it may use "
                "here: set privacy.accountant = \"rdp\", or raise the noise")


def sample_epsilon(history: Sequence[tuple[float, float, int]], *, accountant: str, delta: float) -> float:
    """The epsilon (at ``delta``) of every step in ``history``, by Opacus's ``accountant`` (rdp | prv | gdp), under
    add-or-remove adjacency (Opacus's).

    No step spends nothing: entries without steps (a client that declined its only round holds ``(σ, q, 0)``)
    are dropped, since Opacus's PRV divides by the step count and its RDP turns zero steps into ε ≈ 0.1.

    Raises
    ------
    AccountantError
        If ``accountant`` cannot state these steps here (``check_evaluable``).
    """
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    check_evaluable(history, accountant=accountant, delta=delta)
    # lazily: ~1.5 s to import, unused by most processes
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def replace_one_sample_epsilon(history: Sequence[tuple[float, float, int]], *, delta: float) -> float:
    """The epsilon (at ``delta``) of ``history``'s steps between data sets of the *same size* that differ in one
    example replaced by another: the adjacency that holds when the client publishes its example count (it does:
    its replies carry it, and its sample rate is ``batch / count``).

    dp-accounting's PLD accountant under ``REPLACE_ONE`` (a pessimistic discretisation: an upper bound), where
    every noise multiplier is at least ``PLD_MIN_NOISE``. Below it, the weak triangle inequality of Rényi DP
    (Mironov 2017, Prop. 11, with p = q = 2) on Opacus's add-or-remove RDP curve: a replacement is a removal
    then an addition, so ε_α ≤ (α − ½)/(α − 1)·ε_2α + ε_(2α−1), converted to (ε, δ) as Opacus converts; a bound,
    looser (at σ = 1, q = 0.2, 30 steps: 26.4 against PLD's 11.47). Neither library states replace-one for
    Poisson sampling by RDP (dp-accounting refuses it), hence the fallback here.
    """
    history = [(float(s), float(r), int(n)) for s, r, n in history if n > 0]
    if not history:
        return 0.0
    if min(s for s, _, _ in history) >= PLD_MIN_NOISE:
        import dp_accounting  # lazily, as Opacus: unused by most processes
        from dp_accounting.pld import pld_privacy_accountant

        acc = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                                                   value_discretization_interval=1e-3)
        for sigma, q, steps in history:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return float(acc.get_epsilon(delta))
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    alphas = np.array([a for a in RDPAccountant.DEFAULT_ALPHAS if a > 1], dtype=float)

    def curve(orders: np.ndarray) -> np.ndarray:
        return sum(np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders)), dtype=float)
                   for s, q, n in history)

    rdp = (alphas - 0.5) / (alphas - 1) * curve(2 * alphas) + curve(2 * alphas - 1)
    return float(get_privacy_spent(orders=list(alphas), rdp=rdp, delta=delta)[0])


def calibrate_sample_noise(target_epsilon: float, *, delta: float, sample_rate: float, steps: int,
                           accountant: str) -> float:
    """Smallest noise multiplier (to Opacus's tolerance) whose ``steps`` steps spend at most ``target_epsilon``.

    Raises
    ------
    ValueError
        If no noise level reaches the target (Opacus: "The privacy budget is too low").
    """
    # lazily: ~1.5 s to import, unused by most processes
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def client_start(cfg: ExperimentConfig, num_examples: int) -> tuple[float, float]:
    """A DP-SGD client's noise multiplier and sample rate before its first round, over ``num_examples``
    (``sample_level_start`` of ``cfg``'s sections). Both sides compute it: the client to train, the server's
    ledger to charge a client whose reply never came.

    Raises
    ------
    ValueError
        If no noise level reaches the target, saying over how many steps.
    """
    return sample_level_start(cfg.privacy, cfg.finetune, cfg.rounds, num_examples)


def sample_level_start(p: PrivacySection, ft: FinetuneConfig, rounds: int, num_examples: int) -> tuple[float, float]:
    """A DP-SGD client's noise multiplier and sample rate before its first round, over ``num_examples``:
    ``p.noise_multiplier``, or with ``p.target_epsilon`` calibrated for its whole planned participation
    (every one of ``rounds``, it may be sampled in each, x local epochs x its steps an epoch).

    Raises
    ------
    ValueError
        If no noise level reaches the target, saying over how many steps.
    """
    q, per_epoch = poisson_schedule(num_examples, ft.batch_size)
    if not p.target_epsilon:
        return p.noise_multiplier, q
    planned = rounds * ft.local_epochs * per_epoch
    try:
        return calibrate_sample_noise(p.target_epsilon, delta=p.delta, sample_rate=q, steps=planned,
                                      accountant=p.accountant), q
    except ValueError as err:
        raise ValueError(f"no noise multiplier reaches privacy.target-epsilon = {p.target_epsilon} over {planned} "
                         f"steps (sample rate {q:.3g}) ({err})") from err


def steps_per_round(local_epochs: int, sample_rate: float) -> int:
    """DP-SGD steps of a round of ``local_epochs`` at ``sample_rate`` (``poisson_schedule``'s steps an epoch)."""
    return local_epochs * round(1 / sample_rate)  # the rate is 1 / steps an epoch


# -- client level ----------------------------------------------------------------------
def client_level_accountant(population: int, delta: float, max_epsilon: float | None) -> RdpAccountant:
    """Flower's RDP accountant for releases of ``population`` clients' clipped, noised mean update."""
    return RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=population, neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION, max_epsilon=max_epsilon,
    ))


def client_level_epsilon(sigma: float, *, releases: int, sampled: int, population: int, delta: float) -> float:
    """Epsilon of ``releases`` client-level Gaussian releases at noise multiplier ``sigma``."""
    acc = client_level_accountant(population, delta, None)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=sampled, population_size=population),
                count=releases)
    return acc.get_epsilon(delta)


def replace_one_epsilon(accountant: RdpAccountant) -> float:
    """The epsilon of ``accountant``'s releases when neighbouring runs differ in one client's updates *replaced*
    by another's rather than removed: the mean moves by up to 2C/m, not C/m, so each release counts at half its
    noise multiplier."""
    config = accountant.config
    twice = client_level_accountant(config.population_size, config.target_delta, None)
    for comp in accountant.state_dict()["compositions"]:  # type: ignore[union-attr]
        event = comp["event"]  # type: ignore[index]
        twice.compose(GaussianPrivacyEvent(noise_multiplier=event["noise_multiplier"] / 2,
                                           sample_size=event["sample_size"], population_size=event["population_size"]),
                      count=comp["count"])  # type: ignore[index]
    return twice.get_epsilon(config.target_delta) if twice.num_releases else 0.0


def calibrate_client_noise(target_epsilon: float, *, releases: int, sampled: int, population: int, delta: float,
                           tolerance: float = 0.01) -> float:
    """Smallest noise multiplier whose ``releases`` releases spend at most ``target_epsilon`` (Flower's RDP).

    Opacus's ``get_noise_multiplier`` does this search for its own accountants only;
    this is the same bisection over Flower's accountant, so the server's budget check
    (by the same accountant) agrees with the calibration.
    """
    def eps(sigma: float) -> float:
        return client_level_epsilon(sigma, releases=releases, sampled=sampled, population=population, delta=delta)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon = {target_epsilon} over {releases} rounds")
    while target_epsilon - eps(high) > tolerance and high - low > 1e-9:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high
