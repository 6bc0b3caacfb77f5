"""Pre-trained weights from outside fedtl: torchvision's published weights or a local file.

- ``model.weights = "IMAGENET1K_V1"`` (or ``"DEFAULT"``, any name of the family's
  torchvision weights enum) loads through torchvision's weights API, which reads the torch
  hub cache (``$TORCH_HOME/hub/checkpoints``) and downloads only when the file is not there
  and the machine is online.
- ``model.weights-path = "file.safetensors"`` (or a ``.pth``/``.pt`` saved with
  ``torch.save(model.state_dict())``) loads a local state dict, ``weights_only=True``; or a
  fedtl run's own checkpoint (``run_checkpoint``), whose blocks seed a new run of the same
  backbone (``fedtl.models.factory``).

Tensors are named as the family's own model names them (``Backbone.source``); its
classifier is dropped for fedtl's head. Published weights bring their preprocessing:
images (in [0, 1], resized to ``data.image-size`` by the data) are normalised with the
weights' mean and std, and grey images are repeated to RGB, inside the first block.
"""

from __future__ import annotations

import dataclasses
import pickle  # only for its exception: torch.load(weights_only=True) raises it on a file it refuses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torchvision import models as tvm

from fedtl.errors import WeightsError
from fedtl.models.backbones import Backbone
from fedtl.run_folder import BACKBONE_FINGERPRINT

# Where a file's state dict may sit inside a training checkpoint.
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


class Preprocess(nn.Module):
    """The published weights' input transform: grey to RGB, then per-channel normalisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int) -> None:
        super().__init__()
        self.channels = channels
        # Not persistent: constants of the weights, not state that trains, travels or is fingerprinted.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        return (x - self.mean) / self.std


def published(backbone: str, name: str) -> tvm.WeightsEnum:
    """The torchvision weights ``name`` of the family ``backbone``.

    Raises
    ------
    WeightsError
        If torchvision has no such weights, listing the names it has.
    """
    try:
        enum = tvm.get_model_weights(backbone)
    except (KeyError, ValueError):
        raise WeightsError(f"model.weights = {name!r}: torchvision publishes no weights for {backbone!r}; leave "
                           "model.weights empty (fedtl pre-trains it) or give model.weights-path") from None
    try:
        return enum[name]
    except KeyError:
        raise WeightsError(f"model.weights = {name!r} is not one of {backbone}'s torchvision weights: "
                           f"{', '.join(enum.__members__)}") from None


def download_state(weights: tvm.WeightsEnum) -> dict[str, Tensor]:
    """The state dict of published ``weights``, from the torch hub cache (downloaded when online and missing).

    Raises
    ------
    WeightsError
        If the file is neither cached nor downloadable, naming the file and where to put it.
    """
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise WeightsError(
            f"cannot load {weights}: {cache} is not in the torch hub cache and downloading {weights.url} failed "
            f"({type(err).__name__}: {err}). Copy the file there from a machine that is online, or set "
            "model.weights-path to a local copy") from None


def run_checkpoint(path: str | Path) -> dict[str, Tensor] | None:
    """The blocks of a fedtl run's checkpoint (``checkpoints/last.safetensors`` or ``best.safetensors`` of a run
    folder, which name the backbone they grew from), or ``None`` if ``path`` is not one."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if BACKBONE_FINGERPRINT not in (f.metadata() or {}):
                return None
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("blocks.")}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError):
        return None  # read_state says what is wrong with it


def read_state(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``path``: safetensors, or a torch file read with ``weights_only=True``.

    A training checkpoint holding the state dict under ``state_dict``, ``model_state_dict``
    or ``model`` is unwrapped.

    Raises
    ------
    WeightsError
        If the file is missing, unreadable, or holds something other than named tensors.
    """
    path = Path(path)
    if path.is_dir():  # a Hugging Face model directory, as save_pretrained writes it
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise WeightsError(f"model directory {str(path)!r} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"model.weights-path {str(path)!r} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as err:
        raise WeightsError(f"model.weights-path {str(path)!r} cannot be read as a state dict "
                           f"({type(err).__name__}: {str(err)[:200]})") from None
    if isinstance(state, Mapping):
        for key in _CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not (isinstance(state, Mapping) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise WeightsError(f"model.weights-path {str(path)!r} holds a {type(state).__name__}, not a state dict "
                           "(a mapping of tensor names to tensors, as model.state_dict() returns)")
    return dict(state)


def load_into(backbone: Backbone, state: Mapping[str, Tensor], origin: str) -> None:
    """Load ``state`` (the family's own tensor names) into ``backbone``'s blocks, its classifier left out.

    Raises
    ------
    WeightsError
        If tensors are missing, unexpected or of another shape; all three are listed.
    """
    if backbone.source is None:
        raise WeightsError(f"{origin}: this backbone cannot load outside weights: fedtl pre-trains its own built-in "
                           "backbones, and model.norm = \"group\" replaces the layers published weights were trained "
                           "with (use model.norm = \"native\")")
    ours = {k: v for k, v in backbone.source.state_dict().items() if not k.startswith(backbone.head_prefixes)}
    # Buffers the architecture now recomputes (BERT's position_ids) but older files still carry.
    constants = {k for k, _ in backbone.source.named_buffers()} - set(ours)
    theirs = {k: v for k, v in state.items() if not k.startswith(backbone.head_prefixes)}
    if backbone.fit_state is not None:
        try:
            theirs = backbone.fit_state(theirs)
        except KeyError as err:  # e.g. a ViT's position embeddings missing from another architecture's file
            raise WeightsError(f"{origin} does not fit this backbone: it has no {err}. Is it a state dict of the "
                               "same architecture (model.backbone)?") from None
    theirs = {k: v for k, v in theirs.items() if k not in constants}
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = sorted(f"{k} {tuple(theirs[k].shape)} != {tuple(ours[k].shape)}"
                    for k in set(ours) & set(theirs) if theirs[k].shape != ours[k].shape)
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{origin} does not fit this backbone: {len(missing)} missing {missing[:6]}, {len(unexpected)} "
            f"unexpected {unexpected[:6]}, {len(shapes)} of another shape {shapes[:4]}. Is it a state dict of "
            "the same architecture (model.backbone)?")
    backbone.source.load_state_dict(theirs, strict=False)


def with_preprocess(backbone: Backbone, mean: Sequence[float], std: Sequence[float], channels: int) -> Backbone:
    """``backbone`` with ``Preprocess`` ahead of its first block."""
    (first, block), *rest = backbone.blocks
    return dataclasses.replace(backbone, blocks=[(first, nn.Sequential(Preprocess(mean, std, channels), block)), *rest])


def normalisation(backbone: str, weights: str) -> tuple[list[float], list[float]]:
    """Mean and std the family's ``weights`` were trained with (for a file: its default weights')."""
    preset = published(backbone, weights or "DEFAULT").transforms()
    return list(preset.mean), list(preset.std)
