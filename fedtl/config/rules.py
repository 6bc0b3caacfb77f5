"""The rules across sections that a chosen registry entry adds: settings of other sections it cannot honour.

A privacy mode, a strategy, a personalisation or a LoRA merge may refuse settings elsewhere in the config
(FedProx under DP-SGD, client-level DP with examples weighting, Krum with too few clients per round).
The rules are the config's own, keyed by (catalogue, entry name) and reading only the catalogue's facts
(``fedtl.config.catalogue``), so that checking a config imports no registry; ``ExperimentConfig`` runs
every chosen entry's rules once each field is valid, in field order (strategy, personalisation, LoRA
merge, privacy mode). No code outside the registries and this table compares names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedtl.config.catalogue import HEAD_INITS, LORA_MERGES, PERSONALISATIONS, PRIVACY_MODES, STRATEGIES, Catalogue
from fedtl.config.fields import registry_choices
from fedtl.errors import ConfigError

if TYPE_CHECKING:
    from fedtl.config.schema import ExperimentConfig

Rule = Callable[["ExperimentConfig"], None]
"""Raises ``ConfigError`` for a setting the entry it belongs to cannot honour."""

# Below this noise multiplier Opacus's GDP accountant cannot state epsilon: exp(1/σ²) overflows and its root
# search fails (measured: ValueError from σ = 0.05 down; σ = 0.1 states one).
GDP_MIN_NOISE = 0.1


def refused_per_sample(key: str, why: str) -> Rule:
    """The rule of an entry chosen by ``key`` that cannot work under a per-sample mode (DP-SGD): it refuses the
    pair, saying ``why``."""
    section, field = key.split(".")

    def check(cfg: ExperimentConfig) -> None:
        if PRIVACY_MODES.get(cfg.privacy.mode).per_sample:
            value = getattr(getattr(cfg, section), field.replace("-", "_"))
            raise ConfigError(f"{key} = \"{value}\" with privacy.mode = \"{cfg.privacy.mode}\": {why}")
    return check


# -- privacy modes ---------------------------------------------------------------------------------------------
def _no_class_means_under_dp(cfg: ExperimentConfig) -> None:
    # The head start's class sums would leave every node un-noised and outside the accountant.
    if HEAD_INITS.get(cfg.finetune.head_init).class_means:
        raise ConfigError(
            f"finetune.head-init = \"{cfg.finetune.head_init}\" with privacy.mode = \"{cfg.privacy.mode}\": the head "
            "start sends every client's per-class feature sums and counts without noise, outside the privacy "
            "accountant, so the guarantee would not hold. Use finetune.head-init = \"random\" under DP, or "
            "privacy.mode = \"off\"")


def _gdp_states_epsilon(cfg: ExperimentConfig) -> None:
    p = cfg.privacy
    if p.accountant == "gdp" and not p.target_epsilon and p.noise_multiplier < GDP_MIN_NOISE:
        raise ConfigError(f"privacy.accountant = \"gdp\" cannot state epsilon at privacy.noise-multiplier = "
                          f"{p.noise_multiplier:g} (below {GDP_MIN_NOISE:g} Opacus's GDP formula overflows): set "
                          "privacy.accountant = \"rdp\" (it states any noise), or raise the noise")


def _equal_weights(cfg: ExperimentConfig) -> None:
    if cfg.strategy.weighting == "examples":
        raise ConfigError(
            "client-level DP calibrates its noise to equal client weights, but strategy.weighting = \"examples\": "
            "set strategy.weighting = \"uniform\" (or \"auto\")"
        )


# -- strategies ------------------------------------------------------------------------------------------------
def _noise_scaled_to_the_mean(cfg: ExperimentConfig) -> None:
    # Every strategy's first rule: only a weighted mean of the updates keeps client-level DP's accounting true.
    if not STRATEGIES.get(cfg.strategy.name).averages and PRIVACY_MODES.get(cfg.privacy.mode).noised_update:
        raise ConfigError(
            f"strategy.name = \"{cfg.strategy.name}\" with privacy.mode = \"{cfg.privacy.mode}\": the noise is "
            "scaled to the plain mean of clipped updates (one client moves it by at most C/m), and this "
            "strategy's aggregate moves the released model further for one client's change (a server optimiser "
            "or a robust rule, applied before the noise), so the accounted epsilon would not hold. Use "
            "strategy.name = \"fedavg\" or \"fedprox\" with client-level DP, or privacy.mode = \"dp-sgd\" "
            "with this strategy")


def needs_sampled(least: Callable[[int], int], rule: str) -> Rule:
    """A robust rule's check: a round samples at least ``least(num-malicious-nodes)`` clients, or its
    guarantee does not hold (Bulyan would skip every aggregation; Krum would pick among too few)."""
    def check(cfg: ExperimentConfig) -> None:
        f, n = cfg.strategy.num_malicious_nodes, cfg.sampled_clients
        if n < least(f):
            raise ConfigError(
                f"strategy.name = \"{cfg.strategy.name}\" with strategy.num-malicious-nodes = {f} needs at least "
                f"{least(f)} clients per round ({rule}); a round samples {n}. Add clients, raise "
                "strategy.fraction-train or min-train-nodes, or assume fewer malicious nodes")
    return check


_KRUM = needs_sampled(lambda f: 2 * f + 3, "Krum's n >= 2f + 3, Blanchard et al. 2017")


def _multikrum_selects(cfg: ExperimentConfig) -> None:
    f, n, m = cfg.strategy.num_malicious_nodes, cfg.sampled_clients, cfg.strategy.num_nodes_to_select
    if m > n - f:
        raise ConfigError(f"strategy.num-nodes-to-select = {m} exceeds the {n - f} updates MultiKrum may select from "
                          f"{n} per round with {f} malicious: lower it")


_STRATEGY_RULES: dict[str, tuple[Rule, ...]] = {
    "fedprox": (refused_per_sample(
        "strategy.name", "Opacus builds each update from per-sample gradients of the data loss, so FedProx's "
        "proximal term would be silently dropped. Use another strategy with DP-SGD, or FedProx without it"),),
    "krum": (_KRUM,),
    "multikrum": (_KRUM, _multikrum_selects),
    "bulyan": (needs_sampled(lambda f: 4 * f + 3, "Bulyan's n >= 4f + 3, El Mhamdi et al. 2018"),),
    "qfedavg": (refused_per_sample(
        "strategy.name", "q-FedAvg weights each update by the client's training loss, which DP-SGD does not release "
        "(it is computed from the client's data without noise, so it would tell neighbouring data sets apart). Use "
        "another strategy with DP-SGD, or q-FedAvg without it"),),
}


# -- personalisations ------------------------------------------------------------------------------------------
def _shared_head_only(why: str) -> Rule:
    """The rule of a personalisation with no shared, trained head: it refuses a head start
    (``finetune.head-init = "ncm"`` sets the global head), saying ``why``."""
    def check(cfg: ExperimentConfig) -> None:
        if HEAD_INITS.get(cfg.finetune.head_init).class_means:
            raise ConfigError(f"finetune.head-init = \"{cfg.finetune.head_init}\" with strategy.personalisation = "
                              f"\"{cfg.strategy.personalisation}\": the head start sets the global head, but {why}. "
                              "Use finetune.head-init = \"random\", or another personalisation")
    return check


_LOCAL_HEAD = "each client keeps its own head, which never leaves it"


# -- LoRA merges -----------------------------------------------------------------------------------------------
def _one_rank(cfg: ExperimentConfig) -> None:
    if cfg.finetune.rank_schedule:
        raise ConfigError(
            f"finetune.lora-ranks = {cfg.finetune.lora_ranks!r} gives clients other ranks, whose A and B "
            "strategy.lora-merge = \"average\" cannot average: use \"hetlora\" (zero-padded to lora-rank) or "
            "\"stack\"")


def _stack_is_a_mean(cfg: ExperimentConfig) -> None:
    if not STRATEGIES.get(cfg.strategy.name).averages:
        raise ConfigError(
            f"strategy.lora-merge = \"stack\" folds the weighted mean of the clients' B·A into the base weights, "
            f"but strategy.name = \"{cfg.strategy.name}\" merges otherwise: use fedavg or fedprox, or "
            "strategy.lora-merge = \"average\"")
    if PRIVACY_MODES.get(cfg.privacy.mode).noised_update:
        raise ConfigError(
            f"strategy.lora-merge = \"stack\" with privacy.mode = \"{cfg.privacy.mode}\": the server's noise is "
            "added to A and B apart, not to the stacked product. Use privacy.mode = \"dp-sgd\" (the clients' "
            "noised A and B are then stacked as they are), or strategy.lora-merge = \"average\"")


RULES: dict[tuple[Catalogue[Any], str], tuple[Rule, ...]] = {
    **{(STRATEGIES, name): (_noise_scaled_to_the_mean, *_STRATEGY_RULES.get(name, ())) for name in STRATEGIES.names()},
    # FedPer, FedRep, FedBABU: no shared, trained head for a head start to set.
    (PERSONALISATIONS, "fedper"): (_shared_head_only(_LOCAL_HEAD),),
    (PERSONALISATIONS, "fedrep"): (_shared_head_only(_LOCAL_HEAD), refused_per_sample(
        "strategy.personalisation", "FedRep's extra head phase would train outside the DP-SGD accountant. Use fedper "
        "(the head trains inside DP-SGD) or no DP-SGD")),
    (PERSONALISATIONS, "fedbabu"): (_shared_head_only(
        "FedBABU keeps the head at its shared random start during federation"), refused_per_sample(
        "strategy.personalisation", "FedBABU tunes each client's head on its training split when it evaluates, "
        "without DP and outside the DP-SGD accountant, and replies the tuned head's accuracy. Use fedper (the head "
        "trains inside DP-SGD) or no DP-SGD")),
    (LORA_MERGES, "average"): (_one_rank,),
    (LORA_MERGES, "stack"): (_stack_is_a_mean,),
    (PRIVACY_MODES, "dp-sgd"): (_no_class_means_under_dp, _gdp_states_epsilon),
    (PRIVACY_MODES, "client-level"): (_no_class_means_under_dp, _equal_weights),
}
"""The rules each entry adds, by (catalogue, name), in the order they run; an entry without rules is absent."""


def rules_of(cfg: ExperimentConfig) -> list[Rule]:
    """The rules of every entry ``cfg`` chooses, in field order."""
    return [rule for source, name in registry_choices(cfg) for rule in RULES.get((source, name), ())]


__all__ = ["GDP_MIN_NOISE", "RULES", "Rule", "needs_sampled", "refused_per_sample", "rules_of"]
