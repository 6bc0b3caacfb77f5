"""Fine-tuning modes: a choice of trainable units and their learning rates per round.

A mode maps (block names input->output, round, fine-tuning config) to
``{unit: lr}`` over the units that train that round; ``"head"`` always trains. An
adapter mode also names an adapter (``fedtl.models.adapters``): inside its units only
the adapter's tensors train. ``plan_round`` turns a mode's choice into the round's
``RoundPlan``, the form it travels in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedtl.config import FinetuneConfig, catalogue
from fedtl.models.ncm import HEAD_INITS
from fedtl.protocol import HEAD, RoundPlan
from fedtl.registry import Registry

Rates = Callable[[Sequence[str], int, FinetuneConfig], dict[str, float]]


@dataclass(frozen=True)
class Mode:
    """A fine-tuning mode: its per-round rates, for adapter modes the adapter's name, and the BatchNorm
    policy (``fedtl.batchnorm``) ``finetune.batchnorm = "auto"`` gives it when it has its own."""

    rates: Rates
    adapter: str | None = None
    batchnorm: str | None = None

    def __call__(self, blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
        return self.rates(blocks, rnd, ft)


class ModeRegistry(Registry[Mode]):
    """Modes by name; registering a plain rates function makes it a mode without adapter."""

    def register(self, name: str, adapter: str | None = None,  # type: ignore[override]
                 batchnorm: str | None = None) -> Callable[[Rates], Rates]:
        return self.register_wrapped(name, lambda rates: Mode(rates, adapter, batchnorm))


MODES = ModeRegistry("fine-tuning mode", declared=catalogue.MODES)


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


def adapter_blocks(blocks: Sequence[str], ft: FinetuneConfig) -> tuple[str, ...]:
    """The top ``adapter-blocks`` blocks (all when 0): where an adapter mode trains."""
    k = ft.adapter_blocks or len(blocks)
    return tuple(blocks[max(0, len(blocks) - k):])


def _adapter_rates(blocks: Sequence[str], rnd: int, ft: FinetuneConfig) -> dict[str, float]:
    # New adapter tensors (LoRA) and the few tensors BitFit / BN-only move train at the head's rate.
    return {**{b: ft.lr for b in adapter_blocks(blocks, ft)}, HEAD: ft.lr}


# BN-adapt's point is moving the statistics: under finetune.batchnorm = "auto" they follow the batches and travel.
for _name, _batchnorm in (("lora", None), ("ffa-lora", None), ("bn-only", "batch"), ("bias-only", None)):
    MODES.register(_name, adapter=_name, batchnorm=_batchnorm)(_adapter_rates)


def plan_round(ft: FinetuneConfig, blocks: Sequence[str], rnd: int) -> RoundPlan:
    """The plan of round ``rnd`` (1-based) of mode ``ft.mode`` for a model with ``blocks`` (input to output).
    After a head start (FedNCM), the head trains at ``lr * head-start-lr-scale``: FedNCM+FT's tuned head rate."""
    lrs = MODES.get(ft.mode)(blocks, rnd, ft)
    if HEAD in lrs and HEAD_INITS.get(ft.head_init).class_means:
        lrs = {**lrs, HEAD: lrs[HEAD] * ft.head_start_lr_scale}
    order = [*blocks, HEAD]
    return RoundPlan({u: lrs[u] for u in order if u in lrs}, ft.local_epochs)
