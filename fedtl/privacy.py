"""Privacy modes: one registry entry each, holding what both sides must agree on.

- ``off``: plain local training, plain strategy.
- ``dp-sgd``: sample-level DP; each client trains with Opacus and keeps its accountant
  for the whole run; the strategy is untouched.
- ``client-level``: plain local training; Flower's DP wrapper clips each client's
  update and noises the mean, with Flower's RDP accountant on the server.

An entry is a description: its facts (what one unit of protection is, how updates are
weighted, whether the server noises the merged update), the check the server runs on every
round's plan before round one and the sentence that states the guarantee. Its halves live with
the side that runs them, each in a registry of its own keyed by the same names: the client's
local round and Flower mod in ``fedtl.clients.privacy``, the server's strategy wrapper in
``fedtl.strategies.privacy``. No code compares mode names.

The config knows the modes without importing this module: their names and the facts it reads
are declared in ``fedtl.config.catalogue`` (this registry checks its entries against it), the
settings a mode refuses in other sections are ``fedtl.config.rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedtl.config import ExperimentConfig, PrivacyConfig, catalogue
from fedtl.errors import DPConfigError
from fedtl.protocol import RoundPlan
from fedtl.registry import Registry

if TYPE_CHECKING:
    from fedtl.models.transfer import TransferModel

Guarantee = Callable[[PrivacyConfig, float, "float | None", "float | None"], str]
"""(privacy config, largest epsilon spent by the run's accountant, noise multiplier of the releases, the largest
epsilon under replace-one adjacency) -> the run's guarantee."""


def _no_plan_check(model: TransferModel, plans: Sequence[RoundPlan]) -> None:
    return None


@dataclass(frozen=True)
class PrivacyMode:
    """One privacy mode, as both sides see it.

    Attributes
    ----------
    level : str
        What one unit of protection is, as the ledger records it: ``"sample"``, ``"client"`` or ``"none"``.
    guarantee : Guarantee
        The run's guarantee in one sentence.
    accounted : bool
        Whether the server keeps a privacy ledger (``privacy.jsonl``) and an epsilon column.
    per_sample : bool
        Whether clients build their updates from clipped per-sample gradients of the data loss alone
        (DP-SGD): nothing else may enter the local loss or train outside the accountant.
    uniform_weights : bool
        Whether its noise is calibrated to equal client weights (``strategy.weighting = "auto"``
        then weights clients uniformly).
    noised_update : bool
        Whether the server noises the merged update: BatchNorm statistics must then be merged by
        the wrapper's own rule, never by their exact mean (which would leak them).
    reply_loss : bool
        Whether a client's reply carries its training loss. Computed from its data without noise, the loss
        tells neighbouring data sets apart; DP-SGD's guarantee covers what a client sends, so its replies
        leave it out (client-level DP's server is trusted with it, but it stays outside the guarantee).
    canary_flip : str
        The adjacency of an audit's canary flip under this mode, and so the epsilon ``fedtl audit`` compares its
        lower bound with: ``"add-or-remove"`` (DP-SGD: the canary is in the client's data or not; the client's
        add-or-remove epsilon), or ``"replace-one"`` (client-level: the canary client stays in and its update
        changes; the run's ``epsilon_replace_one``).
    check_plans : Callable[[TransferModel, Sequence[RoundPlan]], None]
        Run by the server before round one on every round's plan: refuses what the mode cannot train.
    """

    level: str
    guarantee: Guarantee
    accounted: bool = True
    per_sample: bool = False
    uniform_weights: bool = False
    noised_update: bool = False
    reply_loss: bool = True
    canary_flip: str = "add-or-remove"
    check_plans: Callable[[TransferModel, Sequence[RoundPlan]], None] = _no_plan_check


def check_dp_trainable(model: TransferModel, units: Sequence[str]) -> None:
    """Refuse BatchNorm in ``units`` that trains or, in training, normalises with its batch's statistics
    (``BatchNorm2d(affine=False)`` has nothing to train and still mixes the batch), with the reason and the
    fixes (checked by the server before round one and by every DP-SGD client each round).

    Raises
    ------
    DPConfigError
        If a BatchNorm layer would train, or run on batch statistics, under DP-SGD.
    """
    from torch.nn.modules.batchnorm import _BatchNorm  # lazily: reading a mode's facts needs no torch

    was = model.training
    model.train()  # the modes the layers train in: frozen norms (LoRA, bias-only) stay in eval mode
    try:
        bad = [f"{u}.{name}" if name else u for u in units
               for name, m in model.unit(u).named_modules()
               if isinstance(m, _BatchNorm) and (m.training or any(p.requires_grad for p in m.parameters(recurse=False)))]
    finally:
        model.train(was)
    if bad:
        raise DPConfigError(
            f"DP-SGD cannot train BatchNorm layers ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}): "
            "on batch statistics (finetune.batchnorm = \"batch\" or \"local\") it normalises each image with its "
            "batch's statistics, so one image's gradient depends on the others in its batch and clipping per sample "
            "no longer bounds any one image's influence; with frozen statistics its γ/β still train, and Opacus "
            "computes no per-sample gradient for a BatchNorm layer. Fix: keep "
            "those blocks frozen (e.g. finetune.mode = \"feature-extraction\"), or set model.norm = \"group\" "
            "(every BatchNorm becomes a GroupNorm, via Opacus's ModuleValidator, before pre-training)."
        )


def check_dp_plans(model: TransferModel, plans: Sequence[RoundPlan]) -> None:
    """``check_dp_trainable`` for every round's trainable set (gradual unfreezing grows it), before round one."""
    before = model.trainable_units
    try:
        for plan in plans:
            plan.apply_to(model)
            check_dp_trainable(model, model.trainable_units)
    finally:
        model.set_trainable_units(before)


def check_client_level_plans(model: TransferModel, plans: Sequence[RoundPlan]) -> None:
    """Refuse BatchNorm statistics in the update under client-level DP: noised, a variance can turn negative.

    Raises
    ------
    DPConfigError
        If some round's travelling tensors include running means or variances.
    """
    for plan in plans:
        stats = [k for k in model.unit_keys(plan.lrs) if k.endswith(("running_mean", "running_var"))]
        if stats:
            raise DPConfigError(
                f"client-level DP would add noise to BatchNorm statistics ({', '.join(stats[:3])}, ...), which can "
                "make a variance negative. Freeze the norms (finetune.mode = \"feature-extraction\" or \"lora\"), "
                "or use GroupNorm (model.norm = \"group\", or the built-in small-cnn)")


def _none(p: PrivacyConfig, epsilon: float, noise: float | None, replace_one: float | None) -> str:
    return "no differential privacy: client updates are sent as trained (privacy.mode = \"off\")"


# What no mode's guarantee covers, said in every sentence (docs/privacy.md says why).
_OUTSIDE = ("each client's evaluation metrics on its own test split, held-out clients' adaptation, and repeated runs "
            "over the same data (--compare-scratch, study sweeps), each of which spends its own ε; σ, δ and the "
            "budget are the server's config")
# Opacus's accountants that bound epsilon; GDP (its CLT approximation) can underestimate it.
BOUNDING_ACCOUNTANTS = ("rdp", "prv")


def _eps(value: float | None) -> str:
    return "not yet stated" if value is None else f"{value:.4g}"


def _sample_level(p: PrivacyConfig, epsilon: float, noise: float | None, replace_one: float | None) -> str:
    steered = f"ε ≤ {epsilon:.4g}" if p.accountant in BOUNDING_ACCOUNTANTS else (
        f"ε ≈ {epsilon:.4g} (Opacus's GDP accountant: an approximation that can underestimate ε, not a bound; "
        "privacy.accountant = \"rdp\" or \"prv\" gives one)")
    return (f"each client's data is (ε, δ)-DP at sample level for ε ≤ {_eps(replace_one)}, δ = {p.delta:g}, against "
            "anyone who sees its replies, the server included: neighbouring data sets have the same size and differ "
            "in one labelled example replaced by another (replace-one: every reply publishes the client's example "
            "count, so data sets of different sizes are told apart; dp-accounting's PLD accountant, or below σ = 0.3 "
            "Rényi DP's weak triangle inequality: upper bounds). "
            f"Under add-or-remove adjacency, which holds only against someone who never learns the count, {steered} "
            f"(Opacus's {p.accountant.upper()} accountant, which privacy.target-epsilon, privacy.max-epsilon and the "
            "per-round budget checks steer) "
            f"(DP-SGD with Opacus, Poisson sampling, over every step each client took). Not covered: {_OUTSIDE}")


def _client_level(p: PrivacyConfig, epsilon: float, noise: float | None, replace_one: float | None) -> str:
    return (f"each client's participation is (ε, δ)-DP at client level for ε ≤ {epsilon:.4g}, δ = {p.delta:g}, "
            "against anyone who sees the released global models, not the server (it sees every clipped update "
            "before the noise; no secure aggregation): neighbouring runs differ in one client's updates, replaced "
            "by nothing (zero-out, the number of clients per round public). Under replace-one (one client's updates "
            f"replaced by another's, as an audit's canary flip does) the sensitivity doubles: ε ≤ {_eps(replace_one)} "
            f"(Flower's {p.clipping} clipping on the {p.clip_on}, noise multiplier {noise or 0:.4g}, Flower's RDP "
            f"accountant, no sampling amplification). Not covered: training metrics (un-noised), {_OUTSIDE}")


PRIVACY_MODES: Registry[PrivacyMode] = Registry("privacy mode", declared=catalogue.PRIVACY_MODES)
PRIVACY_MODES.register("off")(PrivacyMode("none", _none, accounted=False))
PRIVACY_MODES.register("dp-sgd")(PrivacyMode("sample", _sample_level, per_sample=True, reply_loss=False,
                                             check_plans=check_dp_plans))
PRIVACY_MODES.register("client-level")(PrivacyMode(
    "client", _client_level, uniform_weights=True, noised_update=True, canary_flip="replace-one",
    check_plans=check_client_level_plans,
))


def privacy_mode(cfg: ExperimentConfig) -> PrivacyMode:
    """The privacy mode ``cfg`` names."""
    return PRIVACY_MODES.get(cfg.privacy.mode)


__all__ = ["PRIVACY_MODES", "PrivacyMode", "check_client_level_plans", "check_dp_plans", "check_dp_trainable",
           "privacy_mode"]
