"""Client-level DP: Flower's DP strategy wrappers around whichever strategy is chosen.

Each client's update (of the travelling tensors only: ``TransferStrategy`` sits outside
this wrapper) is clipped to ``privacy.max-grad-norm`` on the server or by the client's
mod, and Gaussian noise is added to the mean. One Flower ``RdpAccountant`` composes a
release per merged round. Flower's fixed-clipping wrappers take that accountant
themselves; its adaptive ones take none, so ``_Accounted`` composes for them.
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

    def _event(self, sampled: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(noise_multiplier=self.accounted_sigma, sample_size=sampled,
                                    population_size=self.accountant.config.population_size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
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


class AccountedServerSideAdaptiveClipping(_Accounted, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, accounted."""


class AccountedClientSideAdaptiveClipping(_Accounted, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (with ``adaptiveclipping_mod``), accounted."""


def _adaptive(cls: type) -> Wrapper:
    def build(strategy: Strategy, cfg: ExperimentConfig, sigma: float, acc: RdpAccountant) -> Strategy:
        p = cfg.privacy
        wrapped = cls(strategy, sigma, cfg.sampled_clients, initial_clipping_norm=p.max_grad_norm,
                      target_clipped_quantile=p.target_quantile, clip_norm_lr=p.clip_lr)
        wrapped.accountant, wrapped.accounted_sigma = acc, sigma
        return wrapped
    return build


CLIENT_DP.register("adaptive-server")(_adaptive(AccountedServerSideAdaptiveClipping))
CLIENT_DP.register("adaptive-client")(_adaptive(AccountedClientSideAdaptiveClipping))
