"""Adapters: which tensors inside the chosen blocks train (parameter-efficient fine-tuning).

An adapter is applied once, when the model is built (identically in every process): it
may add modules (LoRA, via ``peft``) and it returns the block tensors that may train,
which become ``TransferModel.adapter_keys``. The rest of each block stays frozen at its
pre-trained values, so only the adapter's tensors (and the head) travel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedtl.config import ConfigError, FinetuneConfig
from fedtl.models.transfer import TransferModel
from fedtl.registry import Registry

# (model, blocks the adapter covers, fine-tuning config) -> block state keys that may train
Adapter = Callable[[TransferModel, Sequence[str], FinetuneConfig], frozenset[str]]
ADAPTERS: Registry[Adapter] = Registry("adapter")

# Normalisation layers: their affine terms and (for BatchNorm) running statistics.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# Layers LoRA adapts: peft's LoRA supports both (a Conv2d gets a conv A and a 1x1 conv B).
LORA_TARGETS = (nn.Conv2d, nn.Linear)
# What peft names an adapted layer's A and B in the state dict (``<layer>.lora_A.default.weight``).
LORA_A, LORA_B = ".lora_A.", ".lora_B."


def _prefixes(blocks: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"blocks.{b}." for b in blocks)


def norm_keys(model: TransferModel, blocks: Sequence[str] | None = None) -> frozenset[str]:
    """State keys of every normalisation layer in ``blocks`` (all blocks when ``None``)."""
    chosen = _prefixes(model.block_names if blocks is None else blocks)
    keys = set()
    for name, m in model.named_modules():
        if isinstance(m, NORM_TYPES) and f"{name}.".startswith(chosen):
            keys.update(f"{name}.{k}" for k in m.state_dict() if k != "num_batches_tracked")
    return frozenset(keys)


@ADAPTERS.register("bn-only")
def bn_only(model: TransferModel, blocks: Sequence[str], ft: FinetuneConfig) -> frozenset[str]:
    """Normalisation layers only: affine terms and BatchNorm statistics (FedBN's layers, BN-adapt)."""
    keys = norm_keys(model, blocks)
    if not keys:
        raise ConfigError(f"finetune.mode = \"bn-only\" found no normalisation layer in blocks {list(blocks)}: "
                          "choose more blocks (finetune.adapter-blocks = 0 is all) or another mode")
    return keys


@ADAPTERS.register("bias-only")
def bias_only(model: TransferModel, blocks: Sequence[str], ft: FinetuneConfig) -> frozenset[str]:
    """Every bias term (BitFit, Ben Zaken et al. 2022)."""
    chosen = _prefixes(blocks)
    keys = frozenset(k for k, _ in model.named_parameters() if k.startswith(chosen) and k.endswith(".bias"))
    if not keys:
        raise ConfigError(f"finetune.mode = \"bias-only\" found no bias in blocks {list(blocks)}: "
                          "choose more blocks (finetune.adapter-blocks = 0 is all) or another mode")
    return keys


def inject_lora(model: TransferModel, blocks: Sequence[str], ft: FinetuneConfig) -> list[str]:
    """Add peft LoRA adapters (rank ``lora-rank``, ``lora-alpha``, ``lora-dropout``) to every
    Conv2d/Linear layer of ``blocks`` (``lora-targets = "attention"``: attention's only; grouped
    convs whose groups the rank is not a multiple of are left out, as peft requires); returns the
    adapted layers' names.

    peft initialises A like the layer (Kaiming-uniform) and B at zero, so the model's output
    is unchanged until B trains. Seed the global RNG first for the same A in every process.
    """
    chosen = _prefixes(blocks)
    # nn.MultiheadAttention reads its out_proj's weight directly, never calling it: a LoRA there would be dead.
    inside_mha = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    targets = [n for n, m in model.named_modules() if isinstance(m, LORA_TARGETS) and f"{n}.".startswith(chosen)
               and n not in inside_mha
               and (ft.lora_targets == "all" or any("attention" in part for part in n.split(".")))
               # peft adapts a grouped (depthwise) conv only when the rank divides into its groups: skip the others.
               and not (isinstance(m, nn.Conv2d) and m.groups > 1 and ft.lora_rank % m.groups)]
    if not targets:
        raise ConfigError(f"LoRA found no {'attention ' if ft.lora_targets == 'attention' else ''}Conv2d or Linear "
                          f"layer in blocks {list(blocks)}: choose more blocks (finetune.adapter-blocks = 0 is all), "
                          "other finetune.lora-targets, or another mode")
    # lazily: ~1.4 s to import, unused by most processes
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=ft.lora_rank, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout, target_modules=targets)
    inject_adapter_in_model(config, model)  # it freezes all else; ``adapt`` then applies the model's trainable set
    return targets


@ADAPTERS.register("lora")
def lora(model: TransferModel, blocks: Sequence[str], ft: FinetuneConfig) -> frozenset[str]:
    """LoRA (Hu et al. 2022) via peft: A and B of every adapted layer train and travel."""
    inject_lora(model, blocks, ft)
    return frozenset(k for k in model.state_dict() if LORA_A in k or LORA_B in k)


@ADAPTERS.register("ffa-lora")
def ffa_lora(model: TransferModel, blocks: Sequence[str], ft: FinetuneConfig) -> frozenset[str]:
    """FFA-LoRA (Sun et al. 2024): A stays at its seeded random init everywhere; only B trains and travels.

    With A fixed and shared, the update B·A is linear in B, so averaging the Bs averages
    the updates exactly; averaging A and B separately does not (mean(B)·mean(A) != mean(B·A)).
    """
    inject_lora(model, blocks, ft)
    return frozenset(k for k in model.state_dict() if LORA_B in k)


def adapt(model: TransferModel, adapter: str, blocks: Sequence[str], ft: FinetuneConfig, seed: int) -> None:
    """Apply the registered ``adapter`` to ``blocks``: sets ``model.adapter_keys``.

    The adapter's random initialisation (LoRA's A) draws from ``seed``, so every process
    that builds the model gets the same tensors.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.adapter_keys = ADAPTERS.get(adapter)(model, blocks, ft)
    model.set_trainable_units(model.trainable_units)  # re-applied: within blocks only adapter keys train
