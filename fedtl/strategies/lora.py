"""LoRA on the server: which tensors make each adapted layer's update, the update ``B·A`` itself, and the
error of merging A and B separately.

peft adds to an adapted layer of weight ``W`` two tensors, ``A`` (``r × in``; a conv's has the layer's
kernel) and ``B`` (``out × r``; a 1×1 conv for a conv layer), and the layer computes with
``W + s·B·A`` (``s = lora-alpha / lora-rank``). Averaging the clients' As and Bs separately merges
``mean(B)·mean(A)``, not the mean of their updates ``mean(B·A)``: the difference is the *merge error*
this module measures. No library computes it (peft's ``get_delta_weight`` needs a live module), hence
the numpy here, which follows peft's own product for Linear and Conv2d layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtl.config import catalogue
from fedtl.errors import ConfigError
from fedtl.models.adapters import LORA_A, LORA_B
from fedtl.protocol import ARRAYS
from fedtl.registry import Registry


def lora_layers(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Adapted layer -> (its A key, its B key), for every layer of ``keys`` (a model's state keys) with both."""
    keys = set(keys)
    out = {}
    for a in sorted(k for k in keys if LORA_A in k):
        layer, rest = a.split(LORA_A, 1)
        b = f"{layer}{LORA_B}{rest}"
        if b in keys:
            out[layer] = (a, b)
    return out


def product(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``B·A`` in the shape of the layer's weight (peft's delta weight without its scaling): a Linear's
    ``(out, in)``, a Conv2d's ``(out, in, kh, kw)``; ``None`` where peft defines no product (grouped convs,
    whose B does not take all of A's rank)."""
    rank = a.shape[0]
    b2 = b.reshape(b.shape[0], -1)
    if b2.shape[1] != rank:
        return None
    delta = b2.astype(np.float64) @ a.reshape(rank, -1).astype(np.float64)
    return delta.reshape(b.shape[0], *a.shape[1:])


def merge_error(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                layers: Mapping[str, tuple[str, str]], fixed: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per adapted layer, ``‖mean(B·A) − mean(B)·mean(A)‖ / ‖mean(B·A)‖`` (Frobenius norms), the means
    weighted by ``weights`` (each update's examples, as FedAvg weights them).

    Parameters
    ----------
    updates : sequence of mappings
        Each client's tensors by state key; an A (or B) that does not travel is read from ``fixed``
        (FFA-LoRA's A, the same seeded tensor everywhere: its error is zero up to float rounding).
    weights : sequence of float
        One weight per update.
    layers : mapping
        ``lora_layers`` of the model.
    fixed : mapping
        The server's copy of every tensor that does not travel.

    Returns
    -------
    dict
        Layer -> relative error; a layer whose mean update is zero (B still at its zero start) counts 0.
        Layers without a product (``product``) or with a tensor in neither place are left out.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    errors = {}
    for layer, (ka, kb) in layers.items():
        pairs = [(u.get(ka, fixed.get(ka)), u.get(kb, fixed.get(kb))) for u in updates]
        if any(a is None or b is None for a, b in pairs):
            continue
        products = [product(a, b) for a, b in pairs]
        if any(p is None for p in products):
            continue
        exact = sum(wi * p for wi, p in zip(w, products, strict=True))
        mean_a = sum(wi * a.astype(np.float64) for wi, (a, _) in zip(w, pairs, strict=True))
        mean_b = sum(wi * b.astype(np.float64) for wi, (_, b) in zip(w, pairs, strict=True))
        merged = product(mean_a, mean_b)
        norm = float(np.linalg.norm(exact))
        errors[layer] = float(np.linalg.norm(exact - merged)) / norm if norm > 0 else 0.0
    return errors


class MergeMeter:
    """``merge_error`` of each round's merged replies, for the adapted layers whose A and B are both either
    travelling or fixed (FedSA-LoRA's local B is neither: its layers are not measured).

    Parameters
    ----------
    state : mapping
        The model's initial state (tensors with ``.numpy()``, or arrays).
    trained : iterable of str or None
        The state keys that may train (``TransferModel.adapter_keys``; ``None``: all); every other A or B
        is fixed.
    local : iterable of str, default ()
        Trained keys that never leave a client (``TransferModel.local_keys``).
    """

    def __init__(self, state: Mapping[str, object], trained: Iterable[str] | None,
                 local: Iterable[str] = ()) -> None:
        local = set(local)
        self.layers = {layer: (a, b) for layer, (a, b) in lora_layers(state).items() if not {a, b} & local}
        keys = {k for pair in self.layers.values() for k in pair}
        self.fixed = {k: np.asarray(state[k]) for k in keys - (keys if trained is None else set(trained))}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __call__(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, float]:
        """Layer -> merge error of ``updates`` (each client's travelling tensors) weighted by ``weights``."""
        return merge_error(updates, weights, self.layers, self.fixed)


@dataclass(frozen=True)
class LoraMerge:
    """How the server merges LoRA's A and B; one registry entry each. The settings a merge cannot honour (other
    ranks under ``average``; ``stack`` with a strategy that is not a mean, or with the server's noise) are the
    config's rules (``fedtl.config.rules``).

    Attributes
    ----------
    any_rank : bool
        Whether clients may hold other ranks than the server's: each is sent the global adapters cut to
        its rank, and its reply is zero-padded back before merging (``Ranks``).
    folds : bool
        Whether each round's merged update goes into the adapted layers' base weights, the adapters
        starting afresh (``Stacking``); else A and B are merged by the strategy like every other tensor.
    """

    any_rank: bool
    folds: bool = False


LORA_MERGES: Registry[LoraMerge] = Registry("LoRA merge", declared=catalogue.LORA_MERGES)
LORA_MERGES.register("average")(LoraMerge(any_rank=False))
# HetLoRA (Cho et al., EMNLP 2024): each client at its own rank; the server zero-pads their A and B to its
# own rank, merges them as the strategy merges, and sends each client the result cut to its rank.
LORA_MERGES.register("hetlora")(LoraMerge(any_rank=True))
# FLoRA (Wang et al., NeurIPS 2024): stacking the clients' (weighted) Bs and As multiplies out to the
# weighted mean of their B·A, exactly, whatever each client's rank.
LORA_MERGES.register("stack")(LoraMerge(any_rank=True, folds=True))


def stack(updates: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float]
          ) -> tuple[np.ndarray, np.ndarray]:
    """FLoRA's stacked adapters of one layer: ``A = [A_1; …; A_K]`` (ranks concatenated) and
    ``B = [w_1·B_1, …, w_K·B_K]`` (weights normalised), so that ``B·A = Σ w_k·B_k·A_k``.

    ``updates`` holds each client's ``(A_k, B_k)``, of any rank; float64 out."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    a = np.concatenate([a.astype(np.float64) for a, _ in updates], axis=0)
    b = np.concatenate([wk * b.astype(np.float64) for wk, (_, b) in zip(w, updates, strict=True)], axis=1)
    return a, b


class Ranks:
    """Adapters at each client's own rank (HetLoRA's cut and pad): the server's A (``r × in``) and B
    (``out × r``) at rank ``r``, a client's at ``r_k ≤ r``, its first ``r_k`` rows of A and columns of B.

    Parameters
    ----------
    state : mapping
        The server's model state: each adapted layer's A and B at the server's rank.
    trained : iterable of str or None
        ``TransferModel.adapter_keys``: every A and B must train (be each client's own, at its rank).

    Raises
    ------
    ConfigError
        If an A or B does not train (FFA-LoRA's A is one fixed tensor at the run's rank), or there is no LoRA.
    """

    def __init__(self, state: Mapping[str, object], trained: Iterable[str] | None) -> None:
        self.layers = lora_layers(state)
        fixed = sorted({k for pair in self.layers.values() for k in pair} - set(trained or ()))
        if not self.layers or fixed:
            raise ConfigError(
                "clients at their own LoRA ranks (finetune.lora-ranks, a node's lora-rank) train A and B at that "
                "rank: it needs finetune.mode = \"lora\""
                + (f" ({fixed[0]} is fixed)" if fixed else " (this model has no LoRA layer)"))
        self.shapes = {k: tuple(np.shape(state[k])) for pair in self.layers.values() for k in pair}
        self.rank = min((self.shapes[a][0] for a, _ in self.layers.values()), default=0)

    def cut(self, record: ArrayRecord, rank: int) -> ArrayRecord:
        """``record`` with every A and B in it cut to ``rank`` (the rest as it is)."""
        out = ArrayRecord()
        for k, arr in record.items():
            if k in self.shapes and rank < self.rank:
                x = arr.numpy()
                x = x[:rank] if LORA_A in k else x[:, :rank]
                out[k] = Array(np.ascontiguousarray(x))
            else:
                out[k] = arr
        return out

    def cut_messages(self, messages: list[Message], record: ArrayRecord, ranks: Mapping[int, int]
                     ) -> dict[int, ArrayRecord]:
        """Each message (carrying ``record``) to a node whose rank in ``ranks`` is below the server's, its
        adapters cut to that rank; node -> what it was sent instead of ``record``."""
        cut = {}
        for m in messages:
            node = m.metadata.dst_node_id
            if ranks.get(node, self.rank) < self.rank:  # a RecordDict of its own: Flower's strategies share one
                cut[node] = self.cut(record, ranks[node])
                m.content = RecordDict({**dict(m.content.items()), ARRAYS: cut[node]})
        return cut

    def pad(self, record: ArrayRecord) -> ArrayRecord:
        """``record`` with every A and B zero-padded to the server's rank (the rest as it is)."""
        out = ArrayRecord()
        for k, arr in record.items():
            x = arr.numpy() if k in self.shapes else None
            if x is not None and x.shape != self.shapes[k]:
                full = np.zeros(self.shapes[k], dtype=x.dtype)
                full[tuple(slice(0, n) for n in x.shape)] = x
                out[k] = Array(full)
            else:
                out[k] = arr
        return out
