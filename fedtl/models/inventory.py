"""What each backbone is made of and what travels per fine-tuning mode (``fedtl backbones``)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from fedtl.config import FinetuneConfig
from fedtl.models.adapters import adapt
from fedtl.models.backbones import build_backbone
from fedtl.models.modes import MODES, adapter_blocks
from fedtl.models.transfer import TransferModel
from fedtl.protocol import RoundPlan
from fedtl.run_folder import TRAVELLING_PARAMS

# The modes the table shows (gradual unfreezing starts as its first round: the top block).
TABLE_MODES = ("feature-extraction", "gradual-unfreezing", "full", "lora", "bn-only", "bias-only")


def travelling_params(model: TransferModel, mode: str, ft: FinetuneConfig) -> int:
    """Elements that travel in round 1 of ``mode`` on a copy of ``model`` (10 classes)."""
    m = copy.deepcopy(model)
    entry = MODES.get(mode)
    if entry.adapter is not None:
        adapt(m, entry.adapter, adapter_blocks(m.block_names, ft), ft, seed=0)
    RoundPlan(entry(m.block_names, 1, ft), 1).apply_to(m)
    return m.size()[TRAVELLING_PARAMS]


def inventory(names: Sequence[str], image_size: int = 32, path: str = "") -> list[dict[str, object]]:
    """One row per backbone: its blocks, parameters and the travelling elements of each ``TABLE_MODES``
    mode (with a 10-class head, LoRA rank 4 on every block's Conv2d/Linear)."""
    ft = FinetuneConfig()
    rows = []
    for name in names:
        backbone = build_backbone(name, 3, image_size=image_size, path=path)
        model = TransferModel(backbone, 10)
        rows.append({"backbone": name, "blocks": list(model.block_names), "params": model.num_parameters(),
                     **{mode: travelling_params(model, mode, ft) for mode in TABLE_MODES}})
    return rows

