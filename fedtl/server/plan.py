"""The per-round plan the server sends: which units train, at which rates, for how long.

It travels in the round's ConfigRecord, so a client needs nothing but the message to
know what to train; gradual unfreezing is just a plan that grows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedtl.config import ExperimentConfig
from fedtl.models.modes import MODES
from fedtl.models.transfer import HEAD, TransferModel

_UNITS, _LRS, _EPOCHS = "plan.units", "plan.lrs", "plan.local-epochs"
# Flower's FedProx puts its proximal weight in the round's config under this key.
PROXIMAL_MU = "proximal-mu"
# The round's ConfigRecord also carries the server's backbone fingerprint under this key.
FINGERPRINT_KEY = "backbone-fingerprint"
# A reply with a ConfigRecord under this key declines the round (with a "reason").
DECLINED = "declined"
# Every reply's metrics carry this weight of 1, for strategies that weight clients equally.
UNIT_WEIGHT = "unit-weight"


@dataclass(frozen=True)
class RoundPlan:
    """What clients do in one round.

    Attributes
    ----------
    lrs : Mapping[str, float]
        Learning rate of every unit that trains (``"head"`` included), input to output.
    local_epochs : int
        Passes over the local data.
    proximal_mu : float
        Weight of FedProx's proximal term (0: none). Flower's FedProx sends it as
        ``"proximal-mu"`` in the round's config.
    """

    lrs: Mapping[str, float]
    local_epochs: int
    proximal_mu: float = 0.0

    @property
    def trainable_blocks(self) -> tuple[str, ...]:
        """Blocks that train (the head excluded)."""
        return tuple(u for u in self.lrs if u != HEAD)

    def apply_to(self, model: TransferModel) -> None:
        """Make ``model`` train exactly this plan's units (the head only if the plan has it)."""
        model.set_trainable(self.trainable_blocks, head=HEAD in self.lrs)

    def to_config(self) -> dict[str, list[str] | list[float] | int]:
        """Entries for the round's ConfigRecord."""
        return {_UNITS: list(self.lrs), _LRS: [float(v) for v in self.lrs.values()], _EPOCHS: self.local_epochs}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> RoundPlan:
        """Read the plan back from a received ConfigRecord."""
        units, lrs, epochs = config.get(_UNITS), config.get(_LRS), config.get(_EPOCHS)
        if not (isinstance(units, list) and isinstance(lrs, list) and len(units) == len(lrs) and isinstance(epochs, int)):
            raise ValueError(f"the round's config carries no valid plan ({_UNITS}, {_LRS}, {_EPOCHS}): is the server fedtl's?")
        return cls(dict(zip(units, lrs)), epochs, float(config.get(PROXIMAL_MU, 0.0)))


def plan_round(cfg: ExperimentConfig, blocks: Sequence[str], rnd: int) -> RoundPlan:
    """The plan of round ``rnd`` (1-based) for a model with ``blocks`` (input to output)."""
    lrs = MODES.get(cfg.finetune.mode)(blocks, rnd, cfg.finetune)
    order = [*blocks, HEAD]
    return RoundPlan({u: lrs[u] for u in order if u in lrs}, cfg.finetune.local_epochs)
