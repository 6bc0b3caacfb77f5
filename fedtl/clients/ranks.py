"""A node's own LoRA rank (HetLoRA): its node config's ``lora-rank``, else the run's rank schedule
(``finetune.lora-ranks``) by its partition, else the run's ``finetune.lora-rank``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fedtl.config import ExperimentConfig
from fedtl.errors import ConfigError
from fedtl.protocol import LORA_RANK, PARTITION_ID
from fedtl.strategies.lora import LORA_MERGES


def node_rank(cfg: ExperimentConfig, node_config: Mapping[str, object]) -> int:
    """This node's LoRA rank."""
    if LORA_RANK in node_config:
        return int(node_config[LORA_RANK])  # type: ignore[call-overload]
    partition = node_config.get(PARTITION_ID)
    return cfg.finetune.rank_of(partition if isinstance(partition, int) else None)


def at_node_rank(cfg: ExperimentConfig, node_config: Mapping[str, object]) -> ExperimentConfig:
    """The run's config as this node runs it: its LoRA at the node's own rank, with ``lora-alpha`` scaled
    along (``α·r_k/r``), so that every rank's update is ``α/r · B·A``, the server's scale, and the first
    ``r_k`` components of the server's adapters mean on the node what they mean on the server.

    Raises
    ------
    ConfigError
        If the rank is not from 1 to the run's ``finetune.lora-rank``, or differs from it under a LoRA
        merge that needs one rank.
    """
    ft, rank = cfg.finetune, node_rank(cfg, node_config)
    if rank == ft.lora_rank:
        return cfg
    if not 1 <= rank <= ft.lora_rank:
        raise ConfigError(f"this node's LoRA rank {rank} (node config {LORA_RANK}) is not from 1 to the run's "
                          f"finetune.lora-rank = {ft.lora_rank}, the server's and the largest: lower it")
    if not LORA_MERGES.get(cfg.strategy.lora_merge).any_rank:
        raise ConfigError(f"this node's LoRA rank {rank} differs from the run's finetune.lora-rank = {ft.lora_rank}, "
                          f"and strategy.lora-merge = \"{cfg.strategy.lora_merge}\" merges one rank only: run with "
                          f"strategy.lora-merge = \"hetlora\" or \"stack\", or drop {LORA_RANK} from the node config")
    return cfg.replace(finetune=dataclasses.replace(ft, lora_rank=rank, lora_alpha=ft.lora_alpha * rank / ft.lora_rank,
                                                    lora_ranks=""))
