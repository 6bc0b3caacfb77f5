"""A set of labelled items as rows of a (usually memory-mapped) array, turned into model input per batch.

Nothing here holds a set's images as one float tensor: ``batch`` gathers a batch's rows,
converts them (uint8 to floats in [0, 1]) on the device and applies each item's domain style
with its own seed, so an item's input is a fixed function of the item, whichever batch it is in.
That is what lets the feature cache (``fedtl.clients.features``) compute a frozen prefix once
per item.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import torch

from fedtl.data.styles import STYLES

# Styles that leave the images as they are.
PLAIN_STYLES = frozenset({"clean", "own"})


@dataclass(frozen=True)
class LabelledImages:
    """Labelled items (images or token ids), each a row of ``rows``.

    Attributes
    ----------
    rows : torch.Tensor
        The array the items are rows of: uint8 images (``(N, C, S, S)``, scaled by 1/255 per batch),
        float images in [0, 1], or int64 token ids ``(N, length)``. Often a data store array
        shared by every process; only the rows a batch needs are read.
    y : torch.Tensor
        Each item's label.
    style : tuple of str
        Each item's domain style (``fedtl.data.styles``; ``"clean"``, ``"own"``: as it is).
    index : torch.Tensor, optional
        Each item's row in ``rows``; ``None``: the items are ``rows`` in order.
    seeds : tuple of int
        Each item's style seed (styles that draw random numbers); empty when no style needs one.
    source : str
        What ``rows`` is (its data store key); ``""``: an in-memory array, identified by its contents.
    """

    rows: torch.Tensor
    y: torch.Tensor
    style: tuple[str, ...]
    index: torch.Tensor | None = None
    seeds: tuple[int, ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)

    @property
    def tokens(self) -> bool:
        """Token ids (text), not images."""
        return self.rows.dim() == 2

    @property
    def styled(self) -> bool:
        """Whether any item has a style that changes it."""
        return any(s not in PLAIN_STYLES for s in self.style)

    def row_ids(self, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``rows`` the items at ``positions`` (default: all) are."""
        pos = torch.arange(len(self)) if positions is None else positions.cpu()
        return pos if self.index is None else self.index[pos]

    def batch(self, positions: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The model input of the items at ``positions``: floats in [0, 1] (images) or token ids, on ``device``."""
        pos = positions.cpu().long()
        raw = self.rows[self.row_ids(pos)]
        if self.tokens:
            return raw.to(device)
        if self.styled:  # on the CPU, item by item: each with its own seed, the same in any batch
            x = _floats(raw)
            for j, p in enumerate(pos.tolist()):
                name = self.style[p]
                if name not in PLAIN_STYLES:
                    g = torch.Generator().manual_seed(self.seeds[p] if self.seeds else 0)
                    x[j] = STYLES.get(name)(x[j:j + 1], g)[0]
            return x.to(device)
        return _floats(raw.to(device))

    @property
    def x(self) -> torch.Tensor:
        """Every item's input at once, on the CPU: for small sets (exports, reports, tests); training streams
        ``batch``."""
        return self.batch(torch.arange(len(self)))

    @cached_property
    def identity(self) -> str:
        """A hash of exactly which inputs these items are (rows, order, styles, seeds): the feature cache's key
        (computed once per set)."""
        h = hashlib.sha256()
        if self.source:
            h.update(self.source.encode())
        else:
            t = self.rows.contiguous()
            h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        h.update(self.row_ids().numpy().astype("int64").tobytes())
        h.update("|".join(self.style).encode())
        h.update(",".join(map(str, self.seeds)).encode())
        return h.hexdigest()[:24]


def _floats(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
