"""Canaries for the empirical privacy audit (``fedtl audit``): extra labelled images one client trains on.

A canary is an image of uniform random pixels with a uniformly random label: unlike any real
item, so a model that saw it can only fit its label by memorising it. The auditor draws ``m``
canaries and, for each, a secret coin: heads, the canary is *planted* (written to the file the
client reads, ``data.canaries``); tails, it is kept out. Training sees only the planted
canaries, never the coins; afterwards the auditor scores every canary on the released model
and guesses which were planted (``fedtl.reports.audit``).

Two files, both safetensors: the auditor's (every canary and its coin, ``write_canaries`` with
``included``) stays in the audit folder; the client's (planted ones only) is what
``data.canaries`` names. Only the client of partition ``data.canary-client`` reads it, and only for
training: its test split and the server's test set are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedtl.data.rows import LabelledImages
from fedtl.errors import DataError


def fresh_seed() -> int:
    """A seed from ``os.urandom``: the coins must not follow from anything in the run's config."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def make_canaries(count: int, *, shape: tuple[int, ...], num_classes: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` canaries for images of ``shape`` (channels, side, side) and their coins.

    Returns
    -------
    images : torch.Tensor
        uint8 ``(count, *shape)``, uniform random pixels.
    labels : torch.Tensor
        int64 ``(count,)``, uniform over ``num_classes``.
    included : torch.Tensor
        bool ``(count,)``: each canary is planted with probability 1/2, independently.
    """
    if count < 1 or num_classes < 2:
        raise ValueError("an audit needs at least one canary and two classes")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=count, dtype=np.int64)
    included = rng.random(count) < 0.5
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(included)


def write_canaries(path: str | Path, images: torch.Tensor, labels: torch.Tensor,
                   included: torch.Tensor | None = None) -> Path:
    """Write canaries to ``path`` (safetensors): with ``included``, the auditor's file; without, a client's."""
    tensors = {"images": images.contiguous(), "labels": labels.contiguous()}
    if included is not None:
        tensors["included"] = included.to(torch.uint8).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def read_canaries(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a canary file (``images``, ``labels`` and, in the auditor's, ``included`` as bool).

    Raises
    ------
    DataError
        If the file is missing or not a canary file.
    """
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise DataError(f"data.canaries = {str(path)!r} cannot be read ({err}): name the planted-canary file "
                        "`fedtl audit` wrote, or set data.canaries = \"\"") from None
    if "images" not in tensors or "labels" not in tensors or tensors["images"].dtype != torch.uint8:
        raise DataError(f"{path} is not a canary file (it needs uint8 'images' and int64 'labels'): name one "
                        "`fedtl audit` wrote")
    if "included" in tensors:
        tensors["included"] = tensors["included"].bool()
    return tensors


def canary_images(path: str | Path, *, shape: tuple[int, ...], num_classes: int) -> LabelledImages:
    """The canaries of ``path`` as labelled images, checked against the task they are planted in.

    Raises
    ------
    DataError
        If their image shape or labels do not fit the scenario's.
    """
    t = read_canaries(path)
    images, labels = t["images"], t["labels"].long()
    if tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"the canaries in {path} are images of shape {tuple(images.shape[1:])}, the scenario's are "
                        f"{tuple(shape)}: run `fedtl audit` again with this config to draw canaries that fit")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise DataError(f"the canaries in {path} have labels outside the scenario's {num_classes} classes: run "
                        "`fedtl audit` again with this config")
    return LabelledImages(images, labels, ("clean",) * len(labels))


def with_canaries(data: LabelledImages, canaries: LabelledImages) -> LabelledImages:
    """``data`` followed by ``canaries``, as one in-memory set (a client's few rows, gathered once).

    Each real item keeps its style and style seed; the canaries are used as they are.
    """
    if data.tokens:
        raise DataError("canaries are images; this scenario's items are token ids (text): audit an image scenario")
    extra = canaries.rows if data.rows.dtype == torch.uint8 else canaries.rows.to(data.rows.dtype) / 255.0
    rows = torch.cat([data.rows[data.row_ids()], extra])
    seeds = (*data.seeds, *(0,) * len(canaries)) if data.seeds else ()
    return LabelledImages(rows, torch.cat([data.y, canaries.y]), (*data.style, *canaries.style), seeds=seeds)
