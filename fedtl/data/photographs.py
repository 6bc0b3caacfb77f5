"""Real photographs that ship inside scikit-image's wheel, and the transfer tasks fedtl makes of them, offline.

scikit-image (``pip install 'fedtl[photos]'``) bundles a few dozen real photographs in ``skimage/data/``; the
ones used here are in the wheel itself, read with scikit-image's own file reader (``skimage.io.imread``), never
through ``skimage.data``'s fetcher, which would go to the network for the files it does not bundle:

- ``photo-textures``: which of ten photographs a 48-pixel patch was cut from: three material textures (brick,
  grass, gravel), a microscopy image (cell), coins, the moon, a scanned page, printed text, a cameraman and a cat
  (chelsea, in grey). Patches are cut at seeded random places; the photographs are large (172 to 660 pixels a
  side), so no two patches of a class are alike and the same patch is never both trained on and tested.
- ``lfw-faces``: the LFW subset: 100 faces and 100 non-faces (backgrounds of the same photographs), 25 pixels.

Both are grey, so fedtl's own CNN pre-trained on the clean source digits (the digits scenarios' source half) and
an ImageNet backbone (grey repeated to RGB) fine-tune the same images. Clients are split as any data set (label
skew with ``data.partitioner = "dirichlet"``; a style per client with ``data.domain-skew = true``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedtl.config import DataConfig
from fedtl.data.digits import digits_images, source_target_indices
from fedtl.data.scenarios import SCENARIOS, Scenario
from fedtl.data.sources import finish_scenario
from fedtl.errors import ConfigError

# The photographs of `photo-textures`, one class each, in label order (files of skimage/data/).
TEXTURES = ("brick", "grass", "gravel", "cell", "coins", "moon", "page", "text", "camera", "chelsea")
PATCH = 48  # pixels a side, before resizing to data.image-size
PATCHES_PER_CLASS = 120
# Fixed for the life of the project: changing it changes every texture task.
PATCH_SEED = 2026


def data_dir() -> Path:
    """scikit-image's bundled data folder.

    Raises
    ------
    ConfigError
        If scikit-image is not installed.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise ConfigError("the photographs scenarios read the photographs scikit-image ships: "
                          "pip install 'fedtl[photos]'")
    return Path(spec.origin).parent / "data"


def _grey(name: str) -> np.ndarray:
    from skimage.io import imread  # the package's file reader: reads the bundled file, fetches nothing

    files = sorted(data_dir().glob(f"{name}.*"))
    if not files:
        raise ConfigError(f"scikit-image's data folder {data_dir()} has no {name!r} photograph: reinstall "
                          "scikit-image (pip install 'fedtl[photos]')")
    img = imread(files[0])
    if img.ndim == 3:  # RGB: ITU-R 601 luma, as PIL's "L"
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    return img.astype(np.float32) / 255.0


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, 1, S, S)`` floats in [0, 1] as uint8 at ``size``, antialiased."""
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0.0, 1.0) * 255).round().to(torch.uint8)


def _with_digit_source(sc: Scenario, cfg: DataConfig) -> Scenario:
    """``sc`` with the clean source digits as its source: fedtl's own backbones pre-train on them, as in the
    digits scenarios (the same pre-trained CNN)."""
    x, y = digits_images(cfg.image_size)
    source, _ = source_target_indices()
    return dataclasses.replace(sc, source_classes=10, source_x=x[source], source_y=y[source])


def texture_patches(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``PATCHES_PER_CLASS`` seeded random ``PATCH``-pixel patches of each photograph of ``TEXTURES``, as
    ``(N, 1, size, size)`` uint8 and their labels."""
    rng = np.random.default_rng(PATCH_SEED)
    xs, ys = [], []
    for label, name in enumerate(TEXTURES):
        img = _grey(name)
        places = img.shape[1] - PATCH + 1  # top-left corners along a row; no corner drawn twice
        corners = rng.choice((img.shape[0] - PATCH + 1) * places, PATCHES_PER_CLASS, replace=False)
        rows, cols = np.divmod(corners, places)
        xs.append(np.stack([img[r:r + PATCH, c:c + PATCH] for r, c in zip(rows, cols)]))
        ys.append(np.full(PATCHES_PER_CLASS, label))
    x = torch.from_numpy(np.concatenate(xs)).unsqueeze(1)
    return _resize(x, size), torch.from_numpy(np.concatenate(ys)).long()


@SCENARIOS.register("photo-textures")
def photo_textures(cfg: DataConfig) -> Scenario:
    """Which of ten real photographs a patch comes from (1,200 patches; a fixed stratified test share)."""
    return _with_digit_source(finish_scenario(cfg, len(TEXTURES), texture_patches(cfg.image_size), None), cfg)


@SCENARIOS.register("lfw-faces")
def lfw_faces(cfg: DataConfig) -> Scenario:
    """Face or not, on scikit-image's LFW subset (200 real 25-pixel photographs; a fixed stratified test share)."""
    x = torch.from_numpy(np.load(data_dir() / "lfw_subset.npy", allow_pickle=False).astype(np.float32))
    y = torch.cat([torch.ones(100), torch.zeros(100)]).long()  # the first 100 are faces (skimage.data.lfw_subset)
    return _with_digit_source(finish_scenario(cfg, 2, (_resize(x.unsqueeze(1), cfg.image_size), y), None), cfg)
