"""fedtl's built-in backbone: a small GroupNorm CNN, pre-trained by fedtl itself.

GroupNorm, not BatchNorm: it trains with the tiny local batches of label-scarce silos,
its behaviour does not depend on the batch, and it is compatible with DP-SGD.
"""

from __future__ import annotations

from torch import nn

from fedtl.models.backbones import BACKBONES, Backbone


def _stage(c_in: int, c_out: int, groups: int, tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.ReLU(), tail)


@BACKBONES.register("small-cnn")
def small_cnn(in_channels: int) -> Backbone:
    """Three conv stages (16, 32, 64 channels); features are a 2x2 pooled 64-channel map (256)."""
    return Backbone(
        blocks=[
            ("conv1", _stage(in_channels, 16, 4, nn.MaxPool2d(2))),
            ("conv2", _stage(16, 32, 8, nn.MaxPool2d(2))),
            ("conv3", _stage(32, 64, 8, nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()))),
        ],
        feature_dim=256,
    )
