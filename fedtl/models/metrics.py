"""Model metrics on labelled images: accuracy, loss, calibration (ECE), per domain style.

The server evaluates the global model on its held-out target test set each round; each
client evaluates the final model on its own test images (``evaluate_model``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtl.data.rows import LabelledImages
from fedtl.models.features import PLAIN, Feed, predict
from fedtl.models.transfer import TransferModel
from fedtl.protocol import ACCURACY, ECE, LOSS

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the example-weighted mean gap between confidence and accuracy.

    Examples are binned by their top probability into ``bins`` equal-width bins of (0, 1]
    (Guo et al. 2017); each bin contributes |accuracy - mean confidence| x its share.
    """
    confidence, predicted = probs.max(1)
    correct = predicted.eq(labels).float()
    # Bin b holds confidences in (b / bins, (b + 1) / bins].
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += float(mask.float().mean() * (correct[mask].mean() - confidence[mask].mean()).abs())
    return ece


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        ACCURACY: float((logits.argmax(1) == labels).float().mean()),
        LOSS: float(F.cross_entropy(logits, labels)),
        ECE: expected_calibration_error(logits.softmax(1), labels),
    }


def evaluate_model(model: TransferModel, data: LabelledImages, feed: Feed = PLAIN) -> dict[str, float]:
    """``accuracy``, ``loss`` (cross-entropy) and ``ece`` of ``model`` on ``data`` (eval mode; the feature
    cache as ``feed`` says)."""
    return _scores(predict(model, data, feed), data.y)


def central_evaluate(model: TransferModel, data: LabelledImages, feed: Feed = PLAIN,
                     cut: int | None = None) -> dict[str, float]:
    """``evaluate_model`` on ``data``, plus ``accuracy/<style>`` for every domain style in it (``cut``: see
    ``fedtl.models.features.feed``)."""
    logits = predict(model, data, feed, cut=cut)
    out = _scores(logits, data.y)
    correct = (logits.argmax(1) == data.y).float()
    styles = list(data.style)
    for style in dict.fromkeys(styles):
        mask = torch.tensor([s == style for s in styles])
        out[f"{ACCURACY}/{style}"] = float(correct[mask].mean())
    return out
