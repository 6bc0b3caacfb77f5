"""Domain styles: the acquisition differences between silos (feature skew).

Each style is a deterministic function of the images and a seeded generator, so a
client sees the same images every round and the server's test set is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF

from fedtl.registry import Registry

Style = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
STYLES: Registry[Style] = Registry("style")


@STYLES.register("clean")
def clean(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The images as they are (the source domain)."""
    return x


@STYLES.register("rotate")
def rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A scanner mounted slightly askew: rotated by 12 to 20 degrees."""
    angles = 12.0 + 8.0 * torch.rand(len(x), generator=g)
    return torch.stack([TF.rotate(img, float(a), interpolation=TF.InterpolationMode.BILINEAR) for img, a in zip(x, angles)])


@STYLES.register("blur")
def blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """An out-of-focus camera: Gaussian blur scaled to the image size."""
    sigma = 0.12 * x.shape[-1] / 2
    k = 2 * int(2 * sigma) + 1
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


@STYLES.register("low-contrast")
def low_contrast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Faded ink on grey paper: contrast cut to 40 % around a bright background."""
    return 0.35 + 0.4 * x


@STYLES.register("noise")
def noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A noisy sensor: additive Gaussian noise (sigma 0.25), clipped to [0, 1]."""
    return (x + 0.25 * torch.randn(x.shape, generator=g)).clamp(0.0, 1.0)


@STYLES.register("shear")
def shear(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Slanted handwriting or a tilted sensor: horizontal shear of 20 to 30 degrees."""
    shears = 20.0 + 10.0 * torch.rand(len(x), generator=g)
    return torch.stack(
        [
            TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[float(s), 0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
            for img, s in zip(x, shears)
        ]
    )


def apply_style(name: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply style ``name`` to images ``x`` with a generator seeded by ``seed``."""
    if len(x) == 0:
        return x
    g = torch.Generator().manual_seed(seed)
    return STYLES.get(name)(x, g).contiguous()
