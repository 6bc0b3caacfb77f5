"""fedtl's built-in backbones: a small CNN, pre-trained by fedtl itself.

``small-cnn`` uses GroupNorm, not BatchNorm: it trains with the tiny local batches of
label-scarce silos, its behaviour does not depend on the batch, and it is compatible with
DP-SGD. ``small-cnn-bn`` is the same network with BatchNorm, for what needs batch
statistics: FedBN keeps each silo's statistics local, BN-only adapts them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedtl.models.backbones import BACKBONES, Backbone

_GROUPS = {16: 4, 32: 8, 64: 8}


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(_GROUPS[channels], channels)


def _stage(c_in: int, c_out: int, norm: Callable[[int], nn.Module], tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), norm(c_out), nn.ReLU(), tail)


def _cnn(in_channels: int, norm: Callable[[int], nn.Module]) -> Backbone:
    return Backbone(
        blocks=[
            ("conv1", _stage(in_channels, 16, norm, nn.MaxPool2d(2))),
            ("conv2", _stage(16, 32, norm, nn.MaxPool2d(2))),
            ("conv3", _stage(32, 64, norm, nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()))),
        ],
        feature_dim=256,
    )


@BACKBONES.register("small-cnn", test_input=(1, 16, 16))
def small_cnn(in_channels: int, image_size: int, path: str) -> Backbone:
    """Three conv stages (16, 32, 64 channels) with GroupNorm; features are a 2x2 pooled 64-channel map (256)."""
    return _cnn(in_channels, _group_norm)


@BACKBONES.register("small-cnn-bn", test_input=(1, 16, 16))
def small_cnn_bn(in_channels: int, image_size: int, path: str) -> Backbone:
    """``small-cnn`` with BatchNorm in place of GroupNorm."""
    return _cnn(in_channels, nn.BatchNorm2d)
