"""What a final model does: the model itself, its confusion matrix and gradient × input saliency maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from fedtl.config import load_config
from fedtl.models.factory import build_model
from fedtl.models.transfer import TransferModel
from fedtl.run_folder import CHECKPOINTS_DIR, CONFIG_FILE, LAST_CHECKPOINT


def final_model(run_dir: Path) -> TransferModel:
    """A run's final global model, from its last checkpoint, in eval mode."""
    cfg = load_config(Path(run_dir) / CONFIG_FILE)
    # The checkpoint holds every tensor: build the architecture only (no pre-trained weights to find).
    model = build_model(cfg, load_weights=False)
    model.load_state_dict(load_file(str(Path(run_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT)))
    return model.eval()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]`` over the examples."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient × input of each image's target logit, summed over channels: ``(N, H, W)``.

    Parameters
    ----------
    model : nn.Module
        Run in eval mode; its parameters are not changed and get no gradients.
    x : torch.Tensor
        Images ``(N, C, H, W)``.
    target : torch.Tensor, optional
        The class whose logit is explained; default the predicted class.
    """
    was_training = model.training
    model.eval()
    x = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(x)
            chosen = logits.argmax(1) if target is None else target.long()
            grad, = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), x)
    finally:
        model.train(was_training)
    return (grad * x).sum(1).detach()
