"""Build the TransferModel of an experiment, identically in every process."""

from __future__ import annotations

import torch

from fedtl.config import ExperimentConfig
from fedtl.data.federated import task
from fedtl.errors import ConfigError, WeightsError
from fedtl.models.adapters import LORA_A, LORA_B, adapt
from fedtl.models.backbones import BACKBONES, Backbone, build_backbone
from fedtl.models.modes import MODES, adapter_blocks
from fedtl.models.pretrain import ensure_pretrained, load_blocks, load_pretrained, pretrains_itself
from fedtl.models.transfer import TransferModel, state_fingerprint
from fedtl.models.weights import download_state, load_into, published, read_state, run_checkpoint, with_preprocess
from fedtl.seeds import derived_seed


def build_model(cfg: ExperimentConfig, *, load_weights: bool = True) -> TransferModel:
    """The experiment's model: pre-trained (or seeded random) blocks, the mode's adapter
    (seeded) and a seeded new head (``fedtl.personalisation.run_model`` adds the local keys).

    Every process that calls this with the same config gets the same tensors, so the
    server only has to send what trains; ``backbone_fingerprint`` (adapters included:
    FFA-LoRA's frozen A must be the same everywhere) lets clients check it.
    ``load_weights = False`` builds the same architecture (outside weights' preprocessing
    included) with random weights, for loading a checkpoint into.
    """
    t = task(cfg.data)
    m = cfg.model
    # A fedtl run's checkpoint seeds this run: its blocks, on the same architecture, and a new head.
    seeded = run_checkpoint(m.weights_path) if cfg.init == "pretrained" and m.weights_path else None
    outside = cfg.init == "pretrained" and not pretrains_itself(cfg) and seeded is None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if seeded is not None and BACKBONES.get(m.backbone).normalisation is not None:
            backbone = outside_backbone(cfg, t.in_channels, load=False)  # its preprocessing, from the checkpoint
        elif outside:
            backbone = outside_backbone(cfg, t.in_channels, load=load_weights)
        else:
            backbone = build_backbone(m.backbone, t.in_channels, m.norm, image_size=cfg.data.image_size,
                                      path=m.weights_path)
        tokens = t.tokens
        if (backbone.takes == "tokens") != tokens:
            raise ConfigError(
                f"model.backbone = {m.backbone!r} takes {backbone.takes}, but data.scenario = {cfg.data.scenario!r} "
                f"gives {'token ids' if tokens else 'images'}: pair text data with a text backbone (minilm, hf-text) "
                "and images with an image one")
        model = TransferModel(backbone, t.num_classes)
        # The head draws from its own stream. Drawn after the same backbone draws as the
        # pre-training head, it would start where that head started: still aligned with
        # the pre-trained features, it would carry the source task into round 0.
        torch.manual_seed(derived_seed("head", cfg.seed))
        model.head.reset_parameters()
    if pretrains_itself(cfg) and load_weights:
        load_pretrained(model, ensure_pretrained(cfg))
    if seeded is not None and load_weights:
        load_blocks(model, seeded, f"model.weights-path {m.weights_path!r} is a fedtl checkpoint of another model",
                    "Seed a run with a checkpoint of the same model.backbone, data.image-size and model.norm; a "
                    "LoRA run's checkpoint holds its adapter and cannot seed one")
    adapter = MODES.get(cfg.finetune.mode).adapter
    if adapter is not None:
        adapt(model, adapter, adapter_blocks(model.block_names, cfg.finetune), cfg.finetune,
              seed=derived_seed("adapter", cfg.seed))
    # What each side must hold alike without it travelling: LoRA tensors that train travel every round
    # (and are at each client's own rank under HetLoRA), so they are left out; FFA-LoRA's fixed A stays in.
    trained_lora = {k for k in model.adapter_keys or () if LORA_A in k or LORA_B in k}
    blocks = {k: v for k, v in model.state_dict().items() if k.startswith("blocks.") and k not in trained_lora}
    model.backbone_fingerprint = state_fingerprint(blocks)
    return model


def outside_backbone(cfg: ExperimentConfig, in_channels: int, *, load: bool = True) -> Backbone:
    """The backbone with ``model.weights`` (torchvision's), ``model.weights-path`` or the family's own
    shipped weights loaded; an image backbone also gets those weights' preprocessing (RGB, their
    normalisation) ahead of its first block.

    Raises
    ------
    WeightsError
        If the weights cannot be found, read, or do not fit the backbone.
    """
    m = cfg.model
    backbone = build_backbone(m.backbone, 3, m.norm, image_size=cfg.data.image_size, path=m.weights_path)
    if load:
        if m.weights_path:
            state, origin = read_state(m.weights_path), f"model.weights-path {m.weights_path!r}"
        elif m.weights:
            state, origin = download_state(published(m.backbone, m.weights)), f"{m.backbone} weights {m.weights}"
        else:
            state, origin = read_state(backbone.own_weights), f"{m.backbone}'s own weights"
        load_into(backbone, state, origin)
    if backbone.takes != "image":
        return backbone
    if in_channels not in (1, 3):
        raise WeightsError(f"{m.backbone}'s pre-trained weights take RGB (or grey) images, not {in_channels} channels")
    preprocess = BACKBONES.get(m.backbone).normalisation
    if preprocess is None:  # fedtl's own families: pre-trained by fedtl, not paired with outside weights
        raise WeightsError(f"model.weights = {m.weights or 'DEFAULT'!r}: torchvision publishes no weights for "
                           f"{m.backbone!r}; leave model.weights empty (fedtl pre-trains it) or give model.weights-path")
    mean, std = preprocess(m.weights)
    return with_preprocess(backbone, mean, std, channels=3)
