"""How the head starts: seeded at random, or from the clients' class means in one round (FedNCM).

FedNCM (Legate et al., "Guiding the last layer in federated learning with pre-trained
models", NeurIPS 2023): with the backbone frozen at its pre-trained weights, every training
client sends, per class, the sum of its L2-normalised features and the count; the server adds
them up and has the exact nearest-class-mean classifier of the pooled data, in one round.

fedtl keeps its head a plain ``nn.Linear`` and writes the classifier into it in a scaled-linear
form: row c is ``NCM_SCALE / mean‖f‖ · μ_c / ‖μ_c‖`` (μ_c the mean of class c's normalised
features, mean‖f‖ the pooled mean feature norm), bias 0. Its logit for a feature f is
``NCM_SCALE · (‖f‖ / mean‖f‖) · cos(f, μ_c)``, so its argmax is exactly the cosine
nearest-class-mean decision (‖f‖ is the same for every class), and a typical image's logits
span ``NCM_SCALE`` times its cosines: soft enough for the configured mode to fine-tune from,
with no new layer for modes, strategies and checkpoints to know about. A class no client holds
gets a zero row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtl.config import catalogue
from fedtl.data.rows import LabelledImages
from fedtl.models.features import Feed, batches, prefix_features
from fedtl.models.transfer import TransferModel
from fedtl.registry import Registry

# Logit scale of the head start: a typical image's logits are this many times its cosines to the class means.
NCM_SCALE = 10.0


@dataclass(frozen=True)
class HeadInit:
    """One way to start the head (the privacy modes and personalisations that cannot go with one refuse it).

    Attributes
    ----------
    class_means : bool
        Whether the server asks the training clients for their class sums before round one (FedNCM).
    """

    class_means: bool = False


HEAD_INITS: Registry[HeadInit] = Registry("head initialisation", declared=catalogue.HEAD_INITS)
HEAD_INITS.register("random")(HeadInit())
HEAD_INITS.register("ncm")(HeadInit(class_means=True))


@torch.no_grad()
def head_inputs(model: TransferModel, data: LabelledImages, feed: Feed) -> torch.Tensor:
    """What the head receives for every item of ``data``: all blocks' output in eval mode, from the
    feature cache when ``feed`` has one (one forward pass per item, reused by later frozen rounds)."""
    model.eval()
    cut = len(model.block_names)
    if feed.cache_dir and len(data):
        return prefix_features(model, data, cut, feed.cache_dir).float()
    parts = []
    for pos in batches(data):
        x = data.batch(pos, model.device)
        for block in model.blocks.values():
            x = block(x)
        parts.append(x.cpu())
    return torch.cat(parts) if parts else torch.zeros(0, model.head.in_features)


def class_sums(features: torch.Tensor, labels: torch.Tensor, num_classes: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class, the sum of the L2-normalised ``features`` and the count; and the sum of the feature norms.

    Returns float32 ``(num_classes, dim)``, ``(num_classes,)`` and a one-element tensor (summed in float64):
    what a client sends, as many bytes as one update of the head.
    """
    f = features.double()
    unit = F.normalize(f, dim=1)
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels.long(), unit)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    return sums.float(), counts.float(), f.norm(dim=1).sum().reshape(1).float()


def ncm_head(sums: torch.Tensor, counts: torch.Tensor, norm_sum: torch.Tensor,
             scale: float = NCM_SCALE) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's weight and bias from the pooled class sums (see the module's docstring).

    Raises
    ------
    ValueError
        If no class has an example.
    """
    sums, counts = sums.double(), counts.double()
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("the class sums hold no example: no client has labelled data")
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    rows = F.normalize(means, dim=1) * (scale / max(float(norm_sum.sum()) / total, 1e-12))
    return rows.float(), torch.zeros(len(counts))
