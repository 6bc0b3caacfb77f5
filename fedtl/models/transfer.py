"""TransferModel: any backbone presented as ordered blocks + a head.

A fine-tuning mode is only a choice over this interface: which units (blocks, head)
train, at which learning rate. Only the state of trainable units travels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedtl.models.backbones import Backbone

HEAD = "head"
# BatchNorm's step counter is bookkeeping, not a weight: averaging integers is meaningless.
_NOT_TRAVELLING = ("num_batches_tracked",)


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (16 hex digits)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


class TransferModel(nn.Module):
    """A backbone's blocks followed by a classification head.

    Parameters
    ----------
    backbone : Backbone
        The blocks, input to output; the last returns ``(batch, feature_dim)``.
    num_classes : int
        Outputs of the head (a ``nn.Linear``).

    Notes
    -----
    Frozen blocks always run in eval mode, also inside ``model.train()``: their
    normalisation statistics never move, which DP requires and makes their output
    a fixed function of the input.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        names = [n for n, _ in backbone.blocks]
        if HEAD in names or len(set(names)) != len(names):
            raise ValueError(f"block names must be unique and not {HEAD!r}: {names}")
        self.blocks = nn.ModuleDict(dict(backbone.blocks))
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.backbone_fingerprint = ""
        self._trainable: tuple[str, ...] = ()
        self.set_trainable([], head=True)

    # -- structure ---------------------------------------------------------------------
    @property
    def block_names(self) -> tuple[str, ...]:
        """Block names, input to output."""
        return tuple(self.blocks.keys())

    @property
    def units(self) -> tuple[str, ...]:
        """Block names then ``"head"``: the units a mode chooses from."""
        return (*self.block_names, HEAD)

    def unit(self, name: str) -> nn.Module:
        """The module of block ``name``, or the head."""
        return self.head if name == HEAD else self.blocks[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = block(x)
        return self.head(x)

    # -- what trains -------------------------------------------------------------------
    @property
    def trainable_units(self) -> tuple[str, ...]:
        """Units that train now, input to output."""
        return self._trainable

    def set_trainable(self, blocks: Iterable[str], *, head: bool = True) -> None:
        """Train exactly ``blocks`` (and the head if ``head``); freeze everything else.

        Raises
        ------
        KeyError
            If a name is not a block of this model.
        """
        chosen = set(blocks)
        unknown = chosen - set(self.block_names)
        if unknown:
            raise KeyError(f"unknown blocks {sorted(unknown)}; this model's blocks are {list(self.block_names)}")
        if head:
            chosen.add(HEAD)
        self._trainable = tuple(u for u in self.units if u in chosen)
        for name in self.units:
            self.unit(name).requires_grad_(name in chosen)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for name in self.units:
            if name not in self._trainable:
                self.unit(name).eval()
        return self

    def param_groups(self, lrs: Mapping[str, float]) -> list[dict[str, object]]:
        """One optimiser parameter group per trainable unit that has parameters.

        Parameters
        ----------
        lrs : Mapping[str, float]
            Learning rate of each trainable unit (``"head"`` included).
        """
        missing = [u for u in self._trainable if u not in lrs]
        if missing:
            raise KeyError(f"no learning rate for trainable units {missing}")
        groups = []
        for name in self._trainable:
            params = [p for p in self.unit(name).parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": float(lrs[name]), "name": name})
        return groups

    # -- what travels ------------------------------------------------------------------
    def unit_keys(self, units: Iterable[str]) -> list[str]:
        """State-dict keys of ``units`` (parameters and statistics, not step counters)."""
        prefixes = tuple(f"{HEAD}." if u == HEAD else f"blocks.{u}." for u in units)
        return [k for k in self.state_dict() if k.startswith(prefixes) and not k.endswith(_NOT_TRAVELLING)]

    def travelling_keys(self) -> list[str]:
        """State-dict keys of the trainable units: exactly what is sent each round."""
        return self.unit_keys(self._trainable)

    def travelling_state(self) -> dict[str, torch.Tensor]:
        """The trainable units' tensors, detached copies on the CPU."""
        sd = self.state_dict()
        return {k: sd[k].detach().cpu().clone() for k in self.travelling_keys()}

    def load_travelling_state(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Overwrite the trainable units' tensors with ``state`` (exactly the travelling keys).

        Raises
        ------
        ValueError
            If ``state`` lacks a travelling key or has keys that do not travel.
        """
        expected = set(self.travelling_keys())
        got = set(state)
        if got != expected:
            raise ValueError(
                f"received tensors do not match this round's trainable set: missing "
                f"{sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
            )
        sd = self.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                sd[k].copy_(torch.as_tensor(v).to(sd[k].dtype))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits for ``x`` in eval mode, ``batch_size`` (default 512) images at a time."""
        self.eval()
        return torch.cat([self(xb) for xb in x.split(batch_size)])

    def num_parameters(self, units: Iterable[str] | None = None) -> int:
        """Parameters of ``units`` (all units when ``None``)."""
        names = self.units if units is None else tuple(units)
        return sum(p.numel() for n in names for p in self.unit(n).parameters())
