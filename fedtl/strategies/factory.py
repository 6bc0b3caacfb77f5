"""The run's strategy from its config and model: each wrapper's parameters from the config section it reads.

``transfer_strategy`` (``fedtl.strategies.transfer``) composes the wrappers; this module only builds their
parameter objects, so a server feature is one wrapper and one line here, not another argument of a big class.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedtl.config import ExperimentConfig, StrategyConfig
from fedtl.models.transfer import TransferModel
from fedtl.personalisation import personal_plan
from fedtl.privacy import privacy_mode
from fedtl.strategies.evaluation import ClientEvaluations
from fedtl.strategies.lora import LORA_MERGES, MergeMeter, Ranks
from fedtl.strategies.registry import steps_server_optimiser, weight_key
from fedtl.strategies.report import RoundObserver
from fedtl.strategies.roster import Roster
from fedtl.strategies.stacking import Stacking
from fedtl.strategies.transfer import LoraMerging, Records, ReplyLimits, Sampling, Travel, transfer_strategy


def lora_stacking(cfg: ExperimentConfig, model: TransferModel) -> Stacking | None:
    """The run's stacked-LoRA merge when ``strategy.lora-merge`` folds, else ``None``.

    Raises
    ------
    ConfigError
        If the model's LoRA tensors cannot all be stacked (``Stacking``).
    """
    if not LORA_MERGES.get(cfg.strategy.lora_merge).folds:
        return None
    ft = cfg.finetune
    return Stacking(model.state_dict(), model.adapter_keys, model.local_keys, ft.lora_alpha / ft.lora_rank, cfg.seed)


def lora_ranks(cfg: ExperimentConfig, model: TransferModel) -> Ranks | None:
    """The cut and pad of adapters at each client's own rank, when ``strategy.lora-merge`` allows other
    ranks (hetlora, stack); else ``None``.

    Raises
    ------
    ConfigError
        If the model's adapters cannot be cut (``Ranks``: no LoRA, or FFA-LoRA's fixed A).
    """
    if not LORA_MERGES.get(cfg.strategy.lora_merge).any_rank:
        return None
    return Ranks(model.state_dict(), model.adapter_keys)


def reply_limits(s: StrategyConfig) -> ReplyLimits:
    """The gate's limits: ``strategy.max-examples`` (0: none) and ``strategy.max-update-ratio``."""
    return ReplyLimits(max_examples=s.max_examples or float("inf"), max_update_ratio=s.max_update_ratio)


def lora_merging(cfg: ExperimentConfig, model: TransferModel) -> LoraMerging:
    """How the run merges LoRA's adapters. The merge error is not measured under a mode that noises the
    updates (client-level DP): it would read the clipped updates before the noise."""
    noised = privacy_mode(cfg).noised_update
    meter = None if noised else MergeMeter(model.state_dict(), model.adapter_keys, model.local_keys)
    return LoraMerging(stacking=lora_stacking(cfg, model), ranks=lora_ranks(cfg, model), meter=meter,
                       weight_key=weight_key(cfg))


def min_nodes(s: StrategyConfig) -> int:
    """Fewest nodes a round needs: the larger of the inner strategy's two minimums."""
    return max(s.min_train_nodes, s.min_available_nodes)


def run_strategy(cfg: ExperimentConfig, model: TransferModel, inner: Strategy, *, observer: RoundObserver,
                 on_evaluate: ClientEvaluations) -> Strategy:
    """``inner`` (the config's Flower strategy in its privacy wrapper) composed for fine-tuning ``model``."""
    travel = Travel(plan=lambda rnd: personal_plan(cfg, model.block_names, rnd), keys_of=model.unit_keys,
                    initial_state=model.state_dict(), fingerprint=model.backbone_fingerprint)
    # Not under client-level DP: its wrapper noises the statistics with the rest, and the exact mean would leak them.
    by_mean = weight_key(cfg) if steps_server_optimiser(inner) and not privacy_mode(cfg).noised_update else None
    return transfer_strategy(
        inner, travel, roster=Roster(cfg.strategy.round_timeout),
        sampling=Sampling(min_nodes=min_nodes(cfg.strategy), most=cfg.sampled_clients, seed=cfg.seed),
        limits=reply_limits(cfg.strategy), lora=lora_merging(cfg, model), statistics_by_mean=by_mean,
        records=Records(observer=observer, final_round=cfg.rounds, on_evaluate=on_evaluate,
                        evaluate_clients=cfg.strategy.evaluate_clients, seed=cfg.seed))
