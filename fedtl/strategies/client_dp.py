"""Client-level DP: Flower's DP strategy wrappers around whichever strategy is chosen.

Each client's update (of the travelling tensors only: the transfer strategy's wrappers sit outside
this wrapper) is clipped to ``privacy.max-grad-norm`` on the server or by the client's
mod, and Gaussian noise is added to the mean. One Flower ``RdpAccountant`` composes a
release per merged round. Flower's fixed-clipping wrappers take that accountant
themselves; its adaptive ones take none, so ``_Accounted`` composes for them.

The noise is scaled to the plain mean of clipped updates (sensitivity C/m under zero-out
adjacency): only strategies whose aggregate is that mean may run inside (the registry's
``averages`` entries: FedAvg, FedProx), with equal weights; anything else is refused when the
config is read.

Flower 1.42's adaptive wrappers (``flwr/serverapp/strategy/dp_adaptive_clipping.py``) are used
with three corrections, each a test in ``tests/unit/test_client_dp.py``:

- They noise the mean with the clipping norm they have just updated for the next round, not
  the one the round's updates were clipped with: when C shrinks, the noise is smaller than the
  accountant assumes. Here the noise uses the norm the updates were clipped with.
- Their norm update takes the fraction of *clipped* updates where Andrew et al. (2021) take the
  fraction left unclipped (norm <= C), so C shrinks even when every update is clipped. Here it
  gets the unclipped fraction: C moves to the ``target-quantile`` of the update norms.
- They split the multiplier between the update and the clipped count as if the count's
  sensitivity were 1/2 (Andrew et al.'s centred count, under add/remove adjacency), but they
  noise the raw count, and under zero-out adjacency one client moves it by 1: the effective
  multiplier was lower than the accounted one. Here the update's share is
  ``(sigma^-2 - sigma_b^-2)^-1/2``, so update and count together are one Gaussian release at the
  configured sigma (``sigma_b = m / 20``, Flower's default, must exceed sigma).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, RdpAccountant
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from fedtl.accounting import calibrate_client_noise, client_level_accountant
from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.registry import Registry

Wrapper = Callable[[Strategy, ExperimentConfig, float, RdpAccountant], Strategy]
CLIENT_DP: Registry[Wrapper] = Registry("client-level DP wrapper (privacy.clipping-privacy.clip-on)")
# The clients' half of the wrappers that clip on the client (Flower's clipping mods) is in fedtl.clients.privacy.


def wrapper_name(cfg: ExperimentConfig) -> str:
    """Registry name of ``cfg``'s wrapper: ``"<clipping>-<clip-on>"``."""
    return f"{cfg.privacy.clipping}-{cfg.privacy.clip_on}"


def client_level_noise(cfg: ExperimentConfig) -> float:
    """The noise multiplier: ``privacy.noise-multiplier``, or calibrated so ``rounds`` releases spend ``target-epsilon``."""
    p = cfg.privacy
    if not p.target_epsilon:
        return p.noise_multiplier
    return calibrate_client_noise(p.target_epsilon, releases=cfg.rounds, sampled=cfg.sampled_clients,
                                  population=cfg.training_clients, delta=p.delta)


def wrap_client_level(strategy: Strategy, cfg: ExperimentConfig) -> tuple[Strategy, RdpAccountant]:
    """``strategy`` inside the client-level DP wrapper ``cfg`` names, and the run's accountant.

    Raises
    ------
    ConfigError
        If Flower's wrapper rejects the settings (its reason is kept).
    """
    acc = client_level_accountant(cfg.training_clients, cfg.privacy.delta, cfg.privacy.budget)
    try:
        return CLIENT_DP.get(wrapper_name(cfg))(strategy, cfg, client_level_noise(cfg), acc), acc
    except ValueError as err:
        raise ConfigError(f"client-level DP ({wrapper_name(cfg)}): {err}") from err


def _fixed(cls: type) -> Wrapper:
    def build(strategy: Strategy, cfg: ExperimentConfig, sigma: float, acc: RdpAccountant) -> Strategy:
        return cls(strategy, sigma, cfg.privacy.max_grad_norm, cfg.sampled_clients, accountant=acc)
    return build


CLIENT_DP.register("fixed-server")(_fixed(DifferentialPrivacyServerSideFixedClipping))
CLIENT_DP.register("fixed-client")(_fixed(DifferentialPrivacyClientSideFixedClipping))


class _Accounted:
    """Accounting for a Flower adaptive-clipping wrapper, as Flower's accounted fixed clipping does it.

    The update noise and the noisy clipped count together form one Gaussian release
    at the configured multiplier (Andrew et al. 2021, as Flower splits it). A release
    is made only from every sampled client's update: with fewer, the mean's
    sensitivity would exceed the one the noise was scaled for.
    """

    accountant: RdpAccountant
    accounted_sigma: float
    num_sampled_clients: int
    clipping_norm: float
    clipped_with: float  # the norm this round's updates are clipped with (set as the round is sent)

    def _event(self, sampled: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.accounted_sigma, sample_size=sampled,
                                    population_size=self.accountant.config.population_size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.clipped_with = self.clipping_norm
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        if messages and self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(
                self._event(len(messages))):
            spent = self.accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(f"the next release would exceed max_epsilon (current epsilon "
                                         f"{spent.epsilon:.4g}, delta {spent.delta:g})")
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if len(replies) != self.num_sampled_clients:
            log(WARNING, "Round %s: %s of %s sampled updates; no private release this round",
                server_round, len(replies), self.num_sampled_clients)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.accountant.compose(self._event(len(replies)))
        return arrays, metrics

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        # Flower calls this after updating clipping_norm for the next round: noise with the norm
        # this round's updates were clipped with instead (see the module).
        following, self.clipping_norm = self.clipping_norm, self.clipped_with
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc,no-any-return]
        finally:
            self.clipping_norm = following

    def _geometric_update(self, clipped_fraction: float) -> None:
        # Flower passes the (noisy) fraction clipped; Andrew et al.'s rule takes the fraction unclipped.
        super()._geometric_update(1.0 - clipped_fraction)  # type: ignore[misc]


class AccountedServerSideAdaptiveClipping(_Accounted, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted."""


class AccountedClientSideAdaptiveClipping(_Accounted, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (with ``adaptiveclipping_mod``), accounted."""


def update_noise(sigma: float, count_stddev: float) -> float:
    """The update's noise multiplier so that it and the clipped count's noise ``count_stddev`` (sensitivity 1,
    zero-out adjacency) together are one Gaussian release at multiplier ``sigma``: (sigma^-2 - count_stddev^-2)^-1/2.

    Raises
    ------
    ConfigError
        If ``count_stddev`` does not exceed ``sigma`` (the count alone would leak more than ``sigma`` allows).
    """
    if sigma <= 0:
        return 0.0
    if count_stddev <= sigma:
        raise ConfigError(
            f"client-level DP with adaptive clipping: the noise multiplier {sigma:g} must be below the clipped "
            f"count's noise ({count_stddev:g}, a twentieth of the clients sampled per round), or the count alone "
            "spends more than the accountant allows. Sample more clients per round, lower "
            "privacy.noise-multiplier (or raise privacy.target-epsilon), or use privacy.clipping = \"fixed\"")
    return float((sigma**-2 - count_stddev**-2) ** -0.5)


def _adaptive(cls: type) -> Wrapper:
    def build(strategy: Strategy, cfg: ExperimentConfig, sigma: float, acc: RdpAccountant) -> Strategy:
        p = cfg.privacy
        count_stddev = cfg.sampled_clients / 20  # Andrew et al.'s choice, Flower's default
        noise = update_noise(sigma, count_stddev)  # first: its message names the fix
        wrapped = cls(strategy, sigma, cfg.sampled_clients, initial_clipping_norm=p.max_grad_norm,
                      target_clipped_quantile=p.target_quantile, clip_norm_lr=p.clip_lr,
                      clipped_count_stddev=count_stddev)
        wrapped.noise_multiplier = noise  # Flower's own split assumes a count sensitivity of 1/2 (see the module)
        wrapped.accountant, wrapped.accounted_sigma = acc, sigma
        wrapped.clipped_with = wrapped.clipping_norm
        return wrapped
    return build


CLIENT_DP.register("adaptive-server")(_adaptive(AccountedServerSideAdaptiveClipping))
CLIENT_DP.register("adaptive-client")(_adaptive(AccountedClientSideAdaptiveClipping))
