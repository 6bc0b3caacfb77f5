"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship inside the package, and their scenarios.

Split once, by a fixed seed, into a *source* half (pre-training) and a *target* half
(federated fine-tuning); no image is in both.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fedtl.config import DataConfig
from fedtl.data.scenarios import DIGIT_STYLES, SCENARIOS, Scenario

# scikit-learn is imported inside the functions that build the store: a client process that only maps
# the store never pays for it (~130 MB per process).

# Fixed for the life of the project: changing it changes every pre-trained backbone.
SOURCE_TARGET_SEED = 1797


@lru_cache(maxsize=4)
def digits_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as ``(N, 1, S, S)`` float images in [0, 1] and ``(N,)`` int64 labels.

    Parameters
    ----------
    image_size : int
        Side ``S``; the 8x8 originals are resized with antialiased bilinear interpolation.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


@lru_cache(maxsize=1)
def source_target_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the source half and the target half (stratified by label, disjoint)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    idx = np.arange(len(labels))
    source, target = train_test_split(idx, test_size=0.5, random_state=SOURCE_TARGET_SEED, stratify=labels)
    return np.sort(source), np.sort(target)


def _pool_test(idx: np.ndarray, labels: np.ndarray, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    # Fixed seed: every run of a study is scored on the same test images.
    return train_test_split(idx, test_size=test_fraction, random_state=SOURCE_TARGET_SEED, stratify=labels[idx])


@SCENARIOS.register("digits-domain-shift")
def digits_domain_shift(cfg: DataConfig) -> Scenario:
    """Pre-train on clean source digits; each client holds target digits in its own style."""
    x, y = digits_images(cfg.image_size)
    source, target = source_target_indices()
    pool, test = _pool_test(target, y.numpy(), cfg.test_fraction)
    return Scenario(10, 10, 1, DIGIT_STYLES, x[source], y[source], x[pool], y[pool], x[test], y[test])


@SCENARIOS.register("digits-split-class")
def digits_split_class(cfg: DataConfig) -> Scenario:
    """Yosinski et al. (2014): pre-train on digits 0-4, fine-tune on 5-9 (relabelled 0-4), clean."""
    x, y = digits_images(cfg.image_size)
    source, target = source_target_indices()
    yn = y.numpy()
    source = source[yn[source] < 5]
    target = target[yn[target] >= 5]
    pool, test = _pool_test(target, yn, cfg.test_fraction)
    return Scenario(5, 5, 1, ("clean",), x[source], y[source], x[pool], y[pool] - 5, x[test], y[test] - 5)
