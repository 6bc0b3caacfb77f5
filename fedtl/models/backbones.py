"""The backbone registry: every family presents itself as ordered blocks + feature size.

timm-style: this module imports no family; families register themselves in their own
modules (``small_cnn``, ``torchvision_backbones``, ``hf_text``), imported by
``fedtl.models``. Each entry carries its facts as data (``BackboneEntry``): its factory
(input channels, image side, weights path -> ``Backbone``; the ``TransferModel`` adds the
head), a small input it runs on, whether it ships its own weights, and the input
normalisation of its published weights. Tests loop over the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fedtl.config import catalogue
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
    source : nn.Module, optional
        The family's own model the blocks were cut from (they share its modules): published
        weights and ``weights-path`` files name their tensors as it does.
    head_prefixes : tuple of str
        State-dict prefixes of ``source``'s own classifier, which fedtl replaces (not loaded).
    fit_state : Callable, optional
        Adapts a published state dict to this instance (ViT: position embeddings to the image size).
    takes : str
        ``"image"`` (float images) or ``"tokens"`` (padded token ids, a text backbone).
    own_weights : str
        A family that ships its weights (a local model directory): where they are.
    """

    blocks: list[tuple[str, nn.Module]]
    feature_dim: int
    source: nn.Module | None = None
    head_prefixes: tuple[str, ...] = ()
    fit_state: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    takes: str = "image"
    own_weights: str = ""


# (input channels, image side, model.weights-path) -> Backbone; the path matters only to
# families whose architecture is read from their files (a Hugging Face model directory).
BackboneFactory = Callable[[int, int, str], Backbone]
# model.weights ("" : the family's default) -> (mean, std) per channel of the weights' input normalisation.
Normalisation = Callable[[str], tuple[list[float], list[float]]]


@dataclass(frozen=True)
class BackboneEntry:
    """One registered backbone and its facts.

    Attributes
    ----------
    build : BackboneFactory
        Builds the backbone with random weights.
    test_input : tuple of int
        The shape of one small input it runs on (``(C, H, W)`` images, or ``(length,)`` token ids).
    ships_weights : bool
        Its pre-trained weights come with it (a package's model directory): fedtl need not pre-train it.
    normalisation : Normalisation, optional
        The per-channel mean and std its published weights expect; ``None``: inputs as they come
        (fedtl's own backbones, in [0, 1]; text: token ids).
    needs_path : bool
        Its architecture is read from ``model.weights-path`` (a local model directory): nothing to build without one.
    """

    build: BackboneFactory
    test_input: tuple[int, ...]
    ships_weights: bool = False
    normalisation: Normalisation | None = None
    needs_path: bool = False


class BackboneRegistry(Registry[BackboneEntry]):
    """Backbones by name; ``register(name, **facts)`` decorates a factory."""

    def register(self, name: str, **facts: Any) -> Callable[[BackboneFactory], BackboneFactory]:  # type: ignore[override]
        return self.register_wrapped(name, lambda build: BackboneEntry(build, **facts))


BACKBONES = BackboneRegistry("backbone", declared=catalogue.BACKBONES)

NormConversion = Callable[[nn.Module], nn.Module]
NORMS: Registry[NormConversion] = Registry("normalisation", declared=catalogue.NORMS)
NORMS.register("native")(lambda block: block)


@NORMS.register("group")
def group_norm(block: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by a GroupNorm (Opacus's ModuleValidator.fix), so it can train under DP."""
    # lazily: ~1.5 s to import, unused by most processes
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(block)


def build_backbone(name: str, in_channels: int, norm: str = "native", *, image_size: int = 32,
                   path: str = "") -> Backbone:
    """Build the registered backbone ``name`` for ``image_size``-pixel images with ``in_channels`` channels.

    ``norm`` (default ``"native"``) names a conversion of its normalisation layers (``NORMS``);
    ``path`` is ``model.weights-path``, read by families whose architecture lives in their files.
    Weights are random; ``fedtl.models.weights`` loads published or file weights.
    """
    backbone = BACKBONES.get(name).build(in_channels, image_size, path)
    if norm == "native":
        return backbone
    convert = NORMS.get(norm)
    return Backbone([(n, convert(b)) for n, b in backbone.blocks], backbone.feature_dim, takes=backbone.takes,
                    own_weights=backbone.own_weights)
