"""Fine-tuning modes: a choice of trainable units and their learning rates per round.

A mode maps (block names input->output, round, fine-tuning config) to
``{unit: lr}`` over the units that train that round; ``"head"`` always trains.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedtl.config import FinetuneConfig
from fedtl.models.transfer import HEAD
from fedtl.registry import Registry

Mode = Callable[[Sequence[str], int, FinetuneConfig], dict[str, float]]
MODES: Registry[Mode] = Registry("fine-tuning mode")


@MODES.register("feature-extraction")
def feature_extraction(blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
    """Frozen backbone; only the head trains, at ``lr``."""
    return {HEAD: ft.lr}


@MODES.register("full")
def full(blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
    """Every block trains at the low rate ``lr * backbone-lr-scale``; the new head at ``lr``."""
    return {**{b: ft.lr * ft.backbone_lr_scale for b in blocks}, HEAD: ft.lr}


@MODES.register("discriminative")
def discriminative(blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
    """Layer-wise rates: block k from the top (top block k=1) trains at ``lr * lr-decay**k``."""
    n = len(blocks)
    return {**{b: ft.lr * ft.lr_decay ** (n - i) for i, b in enumerate(blocks)}, HEAD: ft.lr}


def unfrozen_count(num_blocks: int, rnd: int, every: int) -> int:
    """Top blocks unfrozen in round ``rnd`` (1-based): 1, then one more every ``every`` rounds."""
    return min(num_blocks, 1 + (rnd - 1) // every)


@MODES.register("gradual-unfreezing")
def gradual_unfreezing(blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
    """The top block first, one more block every ``unfreeze-every`` rounds, at ``lr * backbone-lr-scale``."""
    k = unfrozen_count(len(blocks), rnd, ft.unfreeze_every)
    top = blocks[len(blocks) - k:]
    return {**{b: ft.lr * ft.backbone_lr_scale for b in top}, HEAD: ft.lr}
