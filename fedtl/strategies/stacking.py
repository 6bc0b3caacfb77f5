"""Stacked LoRA (FLoRA, Wang et al., NeurIPS 2024): the server merges the clients' adapters exactly.

Each round every client trains fresh adapters (A at peft's random start, B at zero) on the current base
weights. The server stacks the replies' As and weighted Bs (``fedtl.strategies.lora.stack``): their product
is the weighted mean of the clients' updates ``B_k·A_k``, exactly, at any ranks. It folds that (times
peft's scaling) into each adapted layer's base weight and starts the adapters afresh, so the global model
is the folded base with a zero update. The base weights of the adapted layers then go down every round
with the adapters (``protocol.BASE``): more bytes down than averaging A and B, counted in ``bytes_down``.

FLoRA's server sends the stacked modules and each client folds them in; fedtl sends the folded weights
instead, so a client sampled for the first time in a late round starts from every earlier round's merge
without holding state. (Stacking sends ``Σ r_k·(in + out)`` numbers a layer, the folded weight
``in·out``: for the small ranks and few clients of a round they are close; the folded weight never grows.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from fedtl.errors import ConfigError
from fedtl.protocol import BASE
from fedtl.seeds import derived_seed
from fedtl.strategies.lora import lora_layers, product, stack

BASE_WEIGHT = ".base_layer.weight"  # peft's name of the adapted layer's own weight, under the layer


class Stacking:
    """Fold each round's stacked adapters into the base weights.

    Parameters
    ----------
    state : mapping
        The model's initial state: the pre-trained base weights and the adapters' shapes.
    trained, local : iterable of str
        ``TransferModel.adapter_keys`` and ``local_keys``: every A and B must train and travel.
    scaling : float
        peft's ``lora-alpha / lora-rank``: the layer adds ``scaling · B·A``.
    seed : int
        The run's seed: round ``r``'s fresh A of each layer is drawn from it, the same in every run.

    Raises
    ------
    ConfigError
        If the model has no LoRA layer, or an A or B that does not train or stays on the clients.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], trained: Sequence[str] | frozenset[str] | None,
                 local: Sequence[str] | frozenset[str], scaling: float, seed: int) -> None:
        self.layers = lora_layers(state)
        adapters = {k for pair in self.layers.values() for k in pair}
        untrained = sorted(adapters - set(trained or ()) | adapters & set(local))
        if not self.layers or untrained:
            raise ConfigError(
                "strategy.lora-merge = \"stack\" stacks every client's A and B: it needs finetune.mode = \"lora\" "
                "with no personalisation keeping LoRA tensors local"
                + (f" ({untrained[0]} does not travel)" if untrained else " (this model has no LoRA layer)"))
        self.base = {layer: f"{layer}{BASE_WEIGHT}" for layer in self.layers}
        self.initial = {k: state[k].detach().cpu().numpy().copy() for k in self.base.values()}
        self.shapes = {k: tuple(state[k].shape) for pair in self.layers.values() for k in pair}
        self.scaling, self.seed = scaling, seed

    def base_record(self, arrays: ArrayRecord) -> ArrayRecord:
        """The folded base weights in the global ``arrays`` (the pre-trained ones before the first fold)."""
        return ArrayRecord({k: arrays[k] if k in arrays else Array(self.initial[k]) for k in self.base.values()})

    def add_base(self, messages: list[Message], arrays: ArrayRecord) -> ArrayRecord:
        """``base_record(arrays)`` added to every message (``protocol.BASE``); returned."""
        base = self.base_record(arrays)
        for m in messages:
            m.content[BASE] = base
        return base

    def fresh(self, server_round: int, layer: str) -> np.ndarray:
        """Round ``server_round``'s new A of ``layer``: peft's start (Kaiming-uniform, a = √5), from the seed."""
        g = torch.Generator().manual_seed(derived_seed(f"lora-stack:{server_round}:{layer}", self.seed))
        a = torch.empty(self.shapes[self.layers[layer][0]])
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        return a.numpy()

    def fold(self, server_round: int, merged: ArrayRecord, updates: Sequence[Mapping[str, np.ndarray]],
             weights: Sequence[float], base: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """The global arrays after round ``server_round``: ``merged`` (the strategy's merge of the other
        tensors) with each base weight of ``base`` plus ``scaling`` times the stacked product of the
        ``updates`` (weighted by ``weights``), and the adapters of the next round (fresh A, zero B).

        Returns
        -------
        tuple
            The arrays, and each layer's merge error (``lora.merge_error``'s measure, of the stacked
            product against the mean of the ``B_k·A_k``: zero up to float64 rounding).
        """
        out = ArrayRecord(dict(merged.items()))
        w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        errors = {}
        for layer, (ka, kb) in self.layers.items():
            pairs = [(u[ka], u[kb]) for u in updates]
            stacked = product(*stack(pairs, w))
            exact = sum(wk * product(a, b) for wk, (a, b) in zip(w, pairs, strict=True))
            norm = float(np.linalg.norm(exact))
            errors[layer] = float(np.linalg.norm(exact - stacked)) / norm if norm > 0 else 0.0
            old = base[self.base[layer]].numpy()
            out[self.base[layer]] = Array((old.astype(np.float64) + self.scaling * stacked).astype(old.dtype))
            out[ka] = Array(self.fresh(server_round + 1, layer).astype(pairs[0][0].dtype))
            out[kb] = Array(np.zeros(self.shapes[kb], dtype=pairs[0][1].dtype))
        return out, errors
