"""How a model is fed a data set: streamed batches, or a frozen prefix's features from the feature cache.

The blocks below the lowest trainable unit (the *cut*) are frozen and run in eval mode
(``TransferModel``), so their output is a fixed function of each item. Where the feature
cache is on (``finetune.feature-cache = "auto"``) and no random augmentation acts below the
cut, that output is computed once per item and kept in the data store (memory-mapped, shared
by every process of the machine, keyed by the backbone's fingerprint, the cut, the prefix's
modules and exactly which items: ``LabelledImages.identity``); training and evaluation then
run only the blocks above the cut (``Suffix``) on it. Every later epoch, round and run with the
same backbone and data reuses it. When the cut moves down (gradual unfreezing), the new
prefix starts from the nearest lower cut already cached. Under DP-SGD, Opacus wraps the
``Suffix``: per-sample gradients are computed only above the cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedtl.config import ExperimentConfig
from fedtl.data.augment import augmenter
from fedtl.data.rows import LabelledImages
from fedtl.data.store import Writer, open_arrays, store_exists
from fedtl.models.transfer import TransferModel, state_fingerprint

# Items per eval-mode forward pass (a prefix the cache computes, predictions): as many as keep one batch's
# input under FORWARD_BYTES as float32, at most MAX_FORWARD. A forward's activations are a few times its
# input, so at 224 px this is ~27 images (~100 MB of activations; 256 of them took over a GB per process),
# while 16-px digits still go MAX_FORWARD at a time.
FORWARD_BYTES = 16 << 20
MAX_FORWARD = 256


@dataclass(frozen=True)
class Feed:
    """How data reaches a model: through the feature cache (``cache_dir``; ``""``: off) and with which
    training augmentation (``data.augment``)."""

    cache_dir: str = ""
    augment: str = "none"

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> Feed:
        """The run's feed: its store's ``features`` folder when ``finetune.feature-cache = "auto"``."""
        on = cfg.finetune.feature_cache == "auto"
        return cls(str(Path(cfg.data.store_dir) / "features") if on else "", cfg.data.augment)


PLAIN = Feed()


def frozen_prefix(model: TransferModel) -> int:
    """The cut: how many leading blocks have nothing that trains (the index of the lowest trainable block)."""
    trainable = set(model.trainable_units)
    for i, name in enumerate(model.block_names):
        if name in trainable:
            return i
    return len(model.block_names)


class Suffix(nn.Module):
    """The blocks of ``model`` from ``start`` on, then its head: the part that runs on cached features.

    It shares ``model``'s modules (training it trains ``model``); ``train``/``eval`` are ``model``'s own,
    so frozen units above the cut stay in eval mode.
    """

    def __init__(self, model: TransferModel, start: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([model.blocks[n] for n in model.block_names[start:]])
        self.head = model.head
        self._owner = (model,)  # a tuple, so not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def train(self, mode: bool = True) -> Suffix:
        self._owner[0].train(mode)
        self.training = mode
        return self


@dataclass
class ModelFeed:
    """One data set as one model sees it now: ``net`` to run and ``inputs(positions, device)`` to run it on.

    ``net`` is the model itself (``cut == 0``) or its ``Suffix`` above the cut, fed cached features.
    """

    net: nn.Module
    inputs: Callable[[torch.Tensor, torch.device], torch.Tensor]
    cut: int
    cached: bool


def _prefix_parts(model: TransferModel, cut: int, data: LabelledImages) -> dict[str, object]:
    blocks = model.block_names[:cut]
    # The modules' text too: it names what a fingerprint of state cannot (e.g. a preprocessing's constants).
    modules = hashlib.sha256("".join(repr(model.blocks[b]) for b in blocks).encode()).hexdigest()[:16]
    fingerprint = model.backbone_fingerprint or state_fingerprint(
        {k: v for k, v in model.state_dict().items() if k.startswith(tuple(f"blocks.{b}." for b in blocks))})
    return {"kind": "features", "fingerprint": fingerprint, "cut": cut, "blocks": list(blocks), "modules": modules,
            "items": data.identity}


def forward_batch(data: LabelledImages) -> int:
    """Items of ``data`` per eval-mode forward pass (``FORWARD_BYTES`` of float input, at most ``MAX_FORWARD``)."""
    per_item = 4 * max(1, data.rows[0].numel()) if len(data.rows) else 4
    return max(1, min(MAX_FORWARD, FORWARD_BYTES // per_item))


def batches(data: LabelledImages) -> Iterator[torch.Tensor]:
    yield from torch.arange(len(data)).split(forward_batch(data))


@torch.no_grad()
def _compute(model: TransferModel, data: LabelledImages, cut: int, root: Path, w: Writer) -> dict[str, object]:
    # From the nearest lower cut already cached, else from the input.
    start, base = 0, None
    for lower in range(cut - 1, 0, -1):
        parts = _prefix_parts(model, lower, data)
        if store_exists(root, parts):
            start, base = lower, open_arrays(root, parts, _refuse).arrays["features"]
            break
    was = model.training
    model.eval()
    dev = model.device
    blocks = [model.blocks[b] for b in model.block_names[start:cut]]
    out = None
    for pos in batches(data):
        x = base[pos].to(dev) if base is not None else data.batch(pos, dev)
        for block in blocks:
            x = block(x)
        if out is None:
            out = w.array("features", (len(data), *x.shape[1:]), "float32")
        out[pos.numpy()] = x.float().cpu().numpy()
    model.train(was)
    return {"from-cut": start}


def _refuse(w: Writer) -> dict[str, object]:
    raise RuntimeError("a cached prefix vanished while it was being read")


def prefix_features(model: TransferModel, data: LabelledImages, cut: int, cache_dir: str | Path) -> torch.Tensor:
    """The output of ``model``'s first ``cut`` blocks for every item of ``data``, from the cache (computed once
    per machine, under the entry's lock, in eval mode without gradients)."""
    root = Path(cache_dir)
    parts = _prefix_parts(model, cut, data)
    return open_arrays(root, parts, lambda w: _compute(model, data, cut, root, w)).arrays["features"]


def feeder(model: TransferModel, data: LabelledImages, feed: Feed = PLAIN, *, train: bool = False,
         cut: int | None = None) -> ModelFeed:
    """How ``model`` (its trainable set as it is now) is fed ``data``.

    Parameters
    ----------
    model : TransferModel
        The model; its trainable set decides the cut.
    data : LabelledImages
        The items.
    feed : Feed
        The run's feature cache and augmentation (default: neither).
    train : bool, default False
        Training batches (augmented, when ``feed.augment`` says so; the cache is then off, since the
        augmentation acts on the input, below any cut).
    cut : int, optional
        Run from this cut instead of the model's (the server evaluates from the lowest cut any round so far
        trained above); must not exceed ``frozen_prefix(model)``.
    """
    cut = frozen_prefix(model) if cut is None else min(cut, frozen_prefix(model))
    augment = augmenter(feed.augment, data.rows.shape[-1]) if train and not data.tokens else None
    if feed.cache_dir and cut > 0 and augment is None and len(data):
        features = prefix_features(model, data, cut, feed.cache_dir)
        return ModelFeed(Suffix(model, cut), lambda pos, dev: features[pos.cpu()].to(dev), cut, True)

    def stream(pos: torch.Tensor, dev: torch.device) -> torch.Tensor:
        x = data.batch(pos, dev)
        return augment(x) if augment is not None else x

    return ModelFeed(model, stream, 0, False)


@torch.no_grad()
def predict(model: TransferModel, data: LabelledImages, feed: Feed = PLAIN, *, cut: int | None = None) -> torch.Tensor:
    """Logits of every item of ``data`` in eval mode, ``forward_batch(data)`` at a time, on the CPU (the cache as
    ``feed`` says; never augmented)."""
    model.eval()
    f = feeder(model, data, feed, cut=cut)
    dev = model.device
    parts = [f.net(f.inputs(pos, dev)).cpu() for pos in batches(data)]
    return torch.cat(parts) if parts else torch.zeros(0, model.head.out_features)
