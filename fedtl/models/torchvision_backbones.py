"""torchvision's classification models as block lists, built without weights.

Each factory cuts the torchvision model into blocks that share its modules and keeps the
model as the backbone's ``source``, so its published weights (``model.weights``) and
state-dict files (``model.weights-path``) load by torchvision's own tensor names; its
classifier is dropped for fedtl's head. Images with other than 3 channels get a fresh
first convolution of the same shape (only without published weights: with them, grey
images are repeated to RGB instead, see ``fedtl.models.weights``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.vision_transformer import interpolate_embeddings

from fedtl.errors import ConfigError
from fedtl.models.backbones import BACKBONES, Backbone
from fedtl.models.weights import normalisation


def _facts(name: str) -> dict[str, object]:
    # Every family runs on a 32-pixel RGB image (ViT-B/16: two patches a side) and expects its
    # published weights' normalisation, read from torchvision's own weights metadata.
    return {"test_input": (3, 32, 32), "normalisation": lambda weights: normalisation(name, weights)}


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


def _resnet(m: tvm.ResNet, in_channels: int, features: int) -> Backbone:
    m.conv1 = _first_conv(m.conv1, in_channels)
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    blocks = [("stem", stem), ("layer1", m.layer1), ("layer2", m.layer2), ("layer3", m.layer3),
              ("layer4", nn.Sequential(m.layer4, _pool()))]
    return Backbone(blocks, features, source=m, head_prefixes=("fc.",))


@BACKBONES.register("resnet18", **_facts("resnet18"))
def resnet18(in_channels: int, image_size: int, path: str) -> Backbone:
    """ResNet-18: stem, layer1..layer4 (layer4 ends with global pooling); 512 features."""
    return _resnet(tvm.resnet18(weights=None), in_channels, 512)


@BACKBONES.register("resnet50", **_facts("resnet50"))
def resnet50(in_channels: int, image_size: int, path: str) -> Backbone:
    """ResNet-50: stem, layer1..layer4 (bottleneck blocks; layer4 ends with pooling); 2048 features."""
    return _resnet(tvm.resnet50(weights=None), in_channels, 2048)


def _stem_conv(features: nn.Sequential, in_channels: int) -> None:
    features[0][0] = _first_conv(features[0][0], in_channels)


def _mobilenet(m: tvm.MobileNetV3, in_channels: int, stages: list[slice], features: int) -> Backbone:
    f = m.features
    _stem_conv(f, in_channels)
    blocks = [("stem", f[0]), *((f"stage{i}", f[cut]) for i, cut in enumerate(stages, start=1)),
              ("last", nn.Sequential(f[len(f) - 1], _pool()))]
    return Backbone(blocks, features, source=m, head_prefixes=("classifier.",))


@BACKBONES.register("mobilenet_v3_small", **_facts("mobilenet_v3_small"))
def mobilenet_v3_small(in_channels: int, image_size: int, path: str) -> Backbone:
    """MobileNetV3-Small: stem, five inverted-residual stages, last conv + pooling; 576 features."""
    stages = [slice(1, 2), slice(2, 4), slice(4, 7), slice(7, 9), slice(9, 12)]
    return _mobilenet(tvm.mobilenet_v3_small(weights=None), in_channels, stages, 576)


@BACKBONES.register("mobilenet_v3_large", **_facts("mobilenet_v3_large"))
def mobilenet_v3_large(in_channels: int, image_size: int, path: str) -> Backbone:
    """MobileNetV3-Large: stem, five stages (by resolution), last conv + pooling; 960 features."""
    stages = [slice(1, 2), slice(2, 4), slice(4, 7), slice(7, 13), slice(13, 16)]
    return _mobilenet(tvm.mobilenet_v3_large(weights=None), in_channels, stages, 960)


@BACKBONES.register("efficientnet_b0", **_facts("efficientnet_b0"))
def efficientnet_b0(in_channels: int, image_size: int, path: str) -> Backbone:
    """EfficientNet-B0: stem, its seven MBConv stages, last conv + pooling; 1280 features."""
    m = tvm.efficientnet_b0(weights=None)
    f = m.features
    _stem_conv(f, in_channels)
    blocks = [("stem", f[0]), *((f"stage{i}", f[i]) for i in range(1, 8)), ("last", nn.Sequential(f[8], _pool()))]
    return Backbone(blocks, 1280, source=m, head_prefixes=("classifier.",))


@BACKBONES.register("convnext_tiny", **_facts("convnext_tiny"))
def convnext_tiny(in_channels: int, image_size: int, path: str) -> Backbone:
    """ConvNeXt-Tiny: stem, four stages (each after its downsampling), pooling + its LayerNorm; 768 features."""
    m = tvm.convnext_tiny(weights=None)
    f = m.features
    _stem_conv(f, in_channels)
    # The classifier's LayerNorm is pre-trained with the body: it stays, only its Linear goes.
    last = nn.Sequential(m.avgpool, m.classifier[0], m.classifier[1])
    blocks = [("stem", f[0]), ("stage1", f[1]), ("stage2", f[2:4]), ("stage3", f[4:6]), ("stage4", f[6:8]),
              ("last", last)]
    return Backbone(blocks, 768, source=m, head_prefixes=("classifier.2.",))


class _ViTEmbed(nn.Module):
    """Patches, class token and position embeddings: what a ViT does before its encoder layers."""

    def __init__(self, m: tvm.VisionTransformer) -> None:
        super().__init__()
        self.conv_proj = m.conv_proj
        self.class_token = m.class_token
        self.pos_embedding = m.encoder.pos_embedding
        self.dropout = m.encoder.dropout

    def forward(self, x: Tensor) -> Tensor:
        # torchvision's _process_input, through this block's own conv_proj (which LoRA may wrap).
        x = self.conv_proj(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ViTOut(nn.Module):
    """The encoder's final LayerNorm, then the class token's features."""

    def __init__(self, ln: nn.LayerNorm) -> None:
        super().__init__()
        self.ln = ln

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x)[:, 0]


@BACKBONES.register("vit_b_16", **_facts("vit_b_16"))
def vit_b_16(in_channels: int, image_size: int, path: str) -> Backbone:
    """ViT-B/16 at ``image_size`` (a multiple of 16): embedding, encoder layers 0..11 (the last
    with the final LayerNorm); 768 features. Published 224-pixel weights get their position
    embeddings interpolated to the image size (torchvision's ``interpolate_embeddings``)."""
    if image_size % 16:
        raise ConfigError(f"vit_b_16 needs an image size divisible by 16, not {image_size} (set data.image-size)")
    m = tvm.vit_b_16(weights=None, image_size=image_size)
    if in_channels != 3:
        m.conv_proj = _first_conv(m.conv_proj, in_channels)
    layers = list(m.encoder.layers)
    blocks = [("embed", _ViTEmbed(m)), *((f"layer{i}", layer) for i, layer in enumerate(layers[:-1])),
              (f"layer{len(layers) - 1}", nn.Sequential(layers[-1], _ViTOut(m.encoder.ln)))]

    def fit(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return interpolate_embeddings(image_size, 16, state)  # a no-op when the sizes agree

    return Backbone(blocks, 768, source=m, head_prefixes=("heads.",), fit_state=fit)
