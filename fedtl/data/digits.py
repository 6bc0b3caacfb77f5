"""scikit-learn's handwritten digits: 1,797 real 8x8 images that ship inside the package.

Split once, by a fixed seed, into a *source* half (pre-training) and a *target* half
(federated fine-tuning); no image is in both.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

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
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
    return x.contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


@lru_cache(maxsize=1)
def source_target_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the source half and the target half (stratified by label, disjoint)."""
    labels = load_digits().target
    idx = np.arange(len(labels))
    source, target = train_test_split(idx, test_size=0.5, random_state=SOURCE_TARGET_SEED, stratify=labels)
    return np.sort(source), np.sort(target)
