"""Random augmentation of training batches (``data.augment``), with torchvision's transforms v2.

Applied to each training batch after it is read from the store, item by item (each image
gets its own random crop and flip), on the device. Evaluation never augments. An augmented
input differs every epoch, so the feature cache is off under any augmentation but ``"none"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from fedtl.config import catalogue
from fedtl.registry import Registry

Augmentation = Callable[[int], v2.Transform | None]
"""image side -> the transform of one image, or ``None`` (no augmentation)."""
AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation", declared=catalogue.AUGMENTATIONS)
AUGMENTATIONS.register("none")(lambda size: None)
# torchvision's defaults: p = 0.5; crops of 8-100 % of the area at aspect ratios 3/4-4/3, resized back.
AUGMENTATIONS.register("flip")(lambda size: v2.RandomHorizontalFlip())
AUGMENTATIONS.register("crop-flip")(
    lambda size: v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]))


def augmenter(name: str, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function augmenting a batch ``(N, C, size, size)`` item by item (torch's global generator: seed it
    around a round for reproducibility), or ``None`` for ``"none"``."""
    transform = AUGMENTATIONS.get(name)(size)
    if transform is None:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([transform(img) for img in x]) if len(x) else x

    return apply
