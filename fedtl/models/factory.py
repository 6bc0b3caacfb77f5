"""Build the TransferModel of an experiment, identically in every process."""

from __future__ import annotations

import torch

from fedtl.config import ExperimentConfig
from fedtl.data.federated import scenario
from fedtl.models.adapters import adapt
from fedtl.models.backbones import build_backbone
from fedtl.models.modes import MODES, adapter_blocks
from fedtl.models.pretrain import ensure_pretrained, load_pretrained
from fedtl.models.transfer import TransferModel, state_fingerprint
from fedtl.seeds import derived_seed
from fedtl.strategies.personal import personalisation


def build_model(cfg: ExperimentConfig) -> TransferModel:
    """The experiment's model: pre-trained (or seeded random) blocks, the mode's adapter
    (seeded), a seeded new head, and the personalisation's local keys.

    Every process that calls this with the same config gets the same tensors, so the
    server only has to send what trains; ``backbone_fingerprint`` (adapters included:
    FFA-LoRA's frozen A must be the same everywhere) lets clients check it.
    """
    sc = scenario(cfg.data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = TransferModel(build_backbone(cfg.model.backbone, sc.in_channels, cfg.model.norm), sc.num_classes)
        # The head draws from its own stream. Drawn after the same backbone draws as the
        # pre-training head, it would start where that head started: still aligned with
        # the pre-trained features, it would carry the source task into round 0.
        torch.manual_seed(derived_seed("head", cfg.seed))
        model.head.reset_parameters()
    if cfg.init == "pretrained":
        load_pretrained(model, ensure_pretrained(cfg))
    adapter = MODES.get(cfg.finetune.mode).adapter
    if adapter is not None:
        adapt(model, adapter, adapter_blocks(model.block_names, cfg.finetune), cfg.finetune,
              seed=derived_seed("adapter", cfg.seed))
    model.local_keys = personalisation(cfg).local(model)
    blocks = {k: v for k, v in model.state_dict().items() if k.startswith("blocks.")}
    model.backbone_fingerprint = state_fingerprint(blocks)
    return model
