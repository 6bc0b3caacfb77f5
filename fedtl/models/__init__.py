"""Models: the backbone registry, TransferModel, fine-tuning modes and pre-training."""

# Importing the families registers them in BACKBONES.
from fedtl.models import efficientnet_lite, hf_text, small_cnn, torchvision_backbones  # noqa: F401
