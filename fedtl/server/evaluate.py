"""Central evaluation of the global model on the server's held-out target test set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtl.data.federated import LabelledImages
from fedtl.models.transfer import TransferModel


def central_evaluate(model: TransferModel, data: LabelledImages) -> dict[str, float]:
    """Accuracy and loss on ``data``, overall and per domain style.

    Returns
    -------
    dict
        ``accuracy``, ``loss`` and ``accuracy/<style>`` for every style in ``data``.
    """
    logits = model.predict(data.x)
    correct = (logits.argmax(1) == data.y).float()
    out = {"accuracy": float(correct.mean()), "loss": float(F.cross_entropy(logits, data.y))}
    styles = list(data.style)
    for style in dict.fromkeys(styles):
        mask = torch.tensor([s == style for s in styles])
        out[f"accuracy/{style}"] = float(correct[mask].mean())
    return out
