"""TransferModel: any backbone presented as ordered blocks + a head.

A fine-tuning mode is only a choice over this interface: which units (blocks, head)
train, at which learning rate. Two key sets refine it:
- ``adapter_keys``: the only block tensors that can train (LoRA matrices, norm or bias
  terms; ``None``, every tensor of a trainable block), set by the mode's adapter;
- ``local_keys``: tensors that train but never leave the client (a FedPer head, FedBN
  norms), set by the personalisation.
What travels is the trainable units' trainable tensors minus the local ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fedtl.batchnorm import BATCHNORM, MOVING_MOMENTUM, BatchNormPolicy
from fedtl.models.backbones import Backbone
from fedtl.protocol import HEAD
from fedtl.run_folder import MODEL_BYTES, TRAVELLING_BYTES, TRAVELLING_PARAMS

# BatchNorm's step counter is bookkeeping, not a weight: averaging integers is meaningless.
_NOT_TRAVELLING = ("num_batches_tracked",)
# A BatchNorm layer's running statistics: they change only where the BatchNorm policy moves them.
STATISTICS = ("running_mean", "running_var")
BatchNormLayer = nn.modules.batchnorm._BatchNorm


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
    a fixed function of the input. In trainable blocks, BatchNorm follows ``batchnorm``
    (``fedtl.batchnorm``; default ``batch``, torch's own behaviour, until ``set_batchnorm``):
    under ``frozen`` it stays in eval mode too and its statistics neither change nor travel.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        names = [n for n, _ in backbone.blocks]
        if HEAD in names or len(set(names)) != len(names):
            raise ValueError(f"block names must be unique and not {HEAD!r}: {names}")
        self.blocks = nn.ModuleDict(dict(backbone.blocks))
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.backbone_fingerprint = ""
        self.adapter_keys: frozenset[str] | None = None
        self.local_keys: frozenset[str] = frozenset()
        self._trainable: tuple[str, ...] = ()
        self.batchnorm: BatchNormPolicy = BATCHNORM.get("batch")
        self.set_trainable([], head=True)

    def set_batchnorm(self, policy: BatchNormPolicy) -> None:
        """Apply a BatchNorm policy (``fedtl.batchnorm``) to every BatchNorm layer of the blocks; statistics
        that move do so at the standard momentum (``MOVING_MOMENTUM``), whatever the weights' own."""
        self.batchnorm = policy
        if policy.moves:
            for m in self.blocks.modules():
                if isinstance(m, BatchNormLayer) and m.momentum is not None:
                    m.momentum = MOVING_MOMENTUM
        self.train(self.training)

    def statistics_keys(self) -> frozenset[str]:
        """Every BatchNorm running statistic of the blocks."""
        return frozenset(k for k in self.state_dict() if k.startswith("blocks.") and k.endswith(STATISTICS))

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
        if self.adapter_keys is not None:
            for key, p in self.blocks.named_parameters(prefix="blocks"):
                p.requires_grad_(p.requires_grad and key in self.adapter_keys)
        self.train(self.training)

    def set_trainable_units(self, units: Iterable[str]) -> None:
        """``set_trainable`` from a set of units as ``trainable_units`` gives them (the head included or not)."""
        units = set(units)
        self.set_trainable([b for b in self.block_names if b in units], head=HEAD in units)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for name in self.units:
            if name not in self._trainable:
                self.unit(name).eval()
        for prefix, m in self.blocks.named_modules(prefix="blocks"):
            # Under a policy that freezes statistics, and inside an adapter that does not train them (LoRA or
            # bias terms must not drift statistics nobody merges), BatchNorm normalises as it evaluates.
            if isinstance(m, BatchNormLayer) and (not self.batchnorm.moves or (
                    self.adapter_keys is not None and f"{prefix}.running_mean" not in self.adapter_keys)):
                m.eval()
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
    def trained_keys(self, units: Iterable[str]) -> list[str]:
        """State-dict keys that train when ``units`` do (parameters, and statistics where the BatchNorm policy
        moves them; not step counters; within blocks only ``adapter_keys`` when set), local ones included."""
        prefixes = tuple(f"{HEAD}." if u == HEAD else f"blocks.{u}." for u in units)
        return [k for k in self.state_dict() if k.startswith(prefixes) and not k.endswith(_NOT_TRAVELLING)
                and (self.batchnorm.moves or not k.endswith(STATISTICS))
                and (self.adapter_keys is None or k.startswith(f"{HEAD}.") or k in self.adapter_keys)]

    def unit_keys(self, units: Iterable[str]) -> list[str]:
        """State-dict keys that travel when ``units`` train: ``trained_keys`` minus ``local_keys``."""
        return [k for k in self.trained_keys(units) if k not in self.local_keys]

    def kept_keys(self, units: Iterable[str]) -> list[str]:
        """State-dict keys that train when ``units`` do but stay on the client (``local_keys``)."""
        return [k for k in self.trained_keys(units) if k in self.local_keys]

    def travelling_keys(self) -> list[str]:
        """State-dict keys the trainable units send: exactly what travels each round."""
        return self.unit_keys(self._trainable)

    def state_of(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the tensors ``keys``."""
        sd = self.state_dict()
        return {k: sd[k].detach().cpu().clone() for k in keys}

    def travelling_state(self) -> dict[str, torch.Tensor]:
        """The trainable units' travelling tensors, detached copies on the CPU."""
        return self.state_of(self.travelling_keys())

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
        self.load_some(state)

    def load_some(self, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
        """Overwrite the tensors named in ``state`` (any keys of this model), leave the rest.

        Raises
        ------
        KeyError
            If a key is not in this model's state dict.
        """
        sd = self.state_dict()
        unknown = set(state) - set(sd)
        if unknown:
            raise KeyError(f"tensors this model does not have: {sorted(unknown)[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                sd[k].copy_(torch.as_tensor(v).to(sd[k].dtype))

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.parameters()).device

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits for ``x`` in eval mode, ``batch_size`` (default 512) images at a time, computed on
        the model's device and returned on the CPU."""
        self.eval()
        dev = self.device
        return torch.cat([self(xb.to(dev)).cpu() for xb in x.split(batch_size)])

    def num_parameters(self, units: Iterable[str] | None = None) -> int:
        """Parameters of ``units`` (all units when ``None``), adapters excluded: the model's own size."""
        names = self.units if units is None else tuple(units)
        return sum(p.numel() for n in names for k, p in self.unit(n).named_parameters() if not _is_adapter(k))

    def size(self) -> dict[str, int]:
        """What travels per round against what sending the whole model would cost.

        Returns
        -------
        dict
            ``travelling_params`` / ``travelling_bytes``: this round's travelling tensors
            (statistics included); ``model_params`` / ``model_bytes``: every tensor of the model,
            adapters excluded (merged into their layers they add nothing).
        """
        sd = self.state_dict()
        whole = [k for k in sd if not k.endswith(_NOT_TRAVELLING) and not _is_adapter(k)]
        travelling = self.travelling_keys()
        return {
            TRAVELLING_PARAMS: sum(sd[k].numel() for k in travelling),
            TRAVELLING_BYTES: sum(sd[k].numel() * sd[k].element_size() for k in travelling),
            "model_params": sum(sd[k].numel() for k in whole),
            MODEL_BYTES: sum(sd[k].numel() * sd[k].element_size() for k in whole),
        }


def _is_adapter(key: str) -> bool:
    # peft's LoRA tensors are named ``<layer>.lora_A.<adapter>.weight`` (lora_B, lora_embedding_*).
    return ".lora_" in key
