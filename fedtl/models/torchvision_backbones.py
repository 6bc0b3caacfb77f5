"""torchvision CNNs as block lists. Built here without weights (loading weights is separate).

Images with other than 3 channels get a fresh first convolution of the same shape.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from fedtl.models.backbones import BACKBONES, Backbone


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


@BACKBONES.register("resnet18")
def resnet18(in_channels: int) -> Backbone:
    """ResNet-18: stem, layer1..layer4 (layer4 ends with global pooling); 512 features."""
    m = tvm.resnet18(weights=None)
    stem = nn.Sequential(_first_conv(m.conv1, in_channels), m.bn1, m.relu, m.maxpool)
    blocks = [("stem", stem), ("layer1", m.layer1), ("layer2", m.layer2), ("layer3", m.layer3),
              ("layer4", nn.Sequential(m.layer4, _pool()))]
    return Backbone(blocks=blocks, feature_dim=512)


@BACKBONES.register("mobilenet_v3_small")
def mobilenet_v3_small(in_channels: int) -> Backbone:
    """MobileNetV3-Small: stem, five inverted-residual stages, last conv + pooling; 576 features."""
    f = tvm.mobilenet_v3_small(weights=None).features
    f[0][0] = _first_conv(f[0][0], in_channels)
    blocks = [("stem", f[0]), ("stage1", f[1]), ("stage2", f[2:4]), ("stage3", f[4:7]),
              ("stage4", f[7:9]), ("stage5", f[9:12]), ("last", nn.Sequential(f[12], _pool()))]
    return Backbone(blocks=blocks, feature_dim=576)
