"""The server halves of the privacy modes (``fedtl.privacy``): what the run's strategy is wrapped in.

One entry per privacy mode, under the same name; a test checks that every mode has one.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import Strategy

from fedtl.config import ExperimentConfig
from fedtl.registry import Registry
from fedtl.strategies.client_dp import wrap_client_level

StrategyWrap = Callable[[Strategy, ExperimentConfig], tuple[Strategy, RdpAccountant | None]]
"""(the run's strategy, config) -> the strategy to run and the server's accountant, if it keeps one."""


def _as_is(strategy: Strategy, cfg: ExperimentConfig) -> tuple[Strategy, RdpAccountant | None]:
    return strategy, None


SERVER_PRIVACY: Registry[StrategyWrap] = Registry("privacy mode (server half)")
SERVER_PRIVACY.register("off")(_as_is)
SERVER_PRIVACY.register("dp-sgd")(_as_is)  # clients noise their own updates; the strategy is untouched
SERVER_PRIVACY.register("client-level")(wrap_client_level)


def wrap_private(strategy: Strategy, cfg: ExperimentConfig) -> tuple[Strategy, RdpAccountant | None]:
    """``strategy`` inside the server half of ``cfg``'s privacy mode, and the server's accountant (or ``None``)."""
    return SERVER_PRIVACY.get(cfg.privacy.mode)(strategy, cfg)
