"""The backbone registry: every family presents itself as ordered blocks + feature size.

A factory takes the number of input channels and returns a ``Backbone``; the
``TransferModel`` adds the head. Families register themselves in their own modules
(``small_cnn``, ``torchvision_backbones``), imported by ``fedtl.models``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from opacus.validators import ModuleValidator
from torch import nn

from fedtl.registry import Registry


@dataclass
class Backbone:
    """A feature extractor cut into named blocks, input to output.

    Attributes
    ----------
    blocks : list of (str, nn.Module)
        Applied in order; the last one returns ``(batch, feature_dim)`` features.
    feature_dim : int
        Width of the features the head receives.
    """

    blocks: list[tuple[str, nn.Module]]
    feature_dim: int


BackboneFactory = Callable[[int], Backbone]
BACKBONES: Registry[BackboneFactory] = Registry("backbone")

NormConversion = Callable[[nn.Module], nn.Module]
NORMS: Registry[NormConversion] = Registry("normalisation")
NORMS.register("native")(lambda block: block)


@NORMS.register("group")
def group_norm(block: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by a GroupNorm (Opacus's ModuleValidator.fix), so it can train under DP."""
    return ModuleValidator.fix(block)


def build_backbone(name: str, in_channels: int, norm: str = "native") -> Backbone:
    """Build the registered backbone ``name`` for images with ``in_channels`` channels.

    ``norm`` (default ``"native"``) names a conversion of its normalisation layers (``NORMS``).
    """
    backbone = BACKBONES.get(name)(in_channels)
    convert = NORMS.get(norm)
    return Backbone([(n, convert(b)) for n, b in backbone.blocks], backbone.feature_dim)
