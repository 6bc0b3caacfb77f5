"""Split a labelled pool across clients with flwr-datasets' partitioners.

The pool is handed to flwr-datasets as a Hugging Face ``Dataset`` of (index, label)
rows, so its partitioners (not a re-implementation) decide who gets what.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from fedtl.config import catalogue
from fedtl.errors import PartitionError  # noqa: F401 - raised here; importable from here too
from fedtl.registry import Registry

# flwr-datasets (with datasets, pandas and matplotlib, ~330 MB) is imported where a split is built, not at
# import: the config imports this module to check a partitioner's name in every process, clients too.
if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

PartitionerFactory = Callable[[int, float, int, int], "Partitioner"]
PARTITIONERS: Registry[PartitionerFactory] = Registry("partitioner", declared=catalogue.PARTITIONERS)


@PARTITIONERS.register("iid")
def _iid(num_partitions: int, alpha: float, min_size: int, seed: int) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    class ContiguousShards(IidPartitioner):  # type: ignore[misc]
        """flwr-datasets' ``IidPartitioner`` (contiguous shards of the pool, shuffled by ``seed`` before), its
        shards cut in one numpy pass. Its own ``load_partition`` builds a ``datasets`` shard per call, about
        1.4 ms each: 140 s of a 100,000-client run's start. The shards are the same (tested against it)."""

        _shards: list[np.ndarray] | None = None

        def load_partition(self, partition_id: int) -> dict[str, np.ndarray]:  # type: ignore[override]
            if self._shards is None:
                self._shards = np.array_split(np.asarray(self.dataset["index"], dtype=np.int64), self.num_partitions)
            return {"index": self._shards[partition_id]}

    return ContiguousShards(num_partitions=num_partitions)


@PARTITIONERS.register("dirichlet")
def _dirichlet(num_partitions: int, alpha: float, min_size: int, seed: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_partitions, partition_by="label", alpha=alpha,
        min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
    )


@PARTITIONERS.register("natural")
def _natural(num_partitions: int, alpha: float, min_size: int, seed: int) -> Partitioner:
    # Each item names its client (its folder, under data.scenario = "client-folders").
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="group")


def partition_indices(
    labels: np.ndarray, num_partitions: int, *, partitioner: str, alpha: float, min_size: int, seed: int,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices into ``labels`` for each partition.

    Parameters
    ----------
    labels : np.ndarray
        Label of every pool item.
    num_partitions : int
        Number of clients.
    partitioner : str
        A name in ``PARTITIONERS`` (``"iid"``, ``"dirichlet"``).
    alpha : float
        Dirichlet concentration (ignored by ``"iid"``); small alpha = strong label skew.
    min_size : int
        Smallest partition accepted (Dirichlet resamples until every client has it).
    seed : int
        Seed of the split.
    groups : np.ndarray, optional
        The client each item belongs to (0..k-1), for the ``"natural"`` partitioner.

    Raises
    ------
    PartitionError
        If a client would get fewer than ``max(min_size, 1)`` items.
    """
    if num_partitions > len(labels):
        raise PartitionError(
            f"{num_partitions} clients but only {len(labels)} labelled images in the pool: "
            "lower `clients` or use a larger data set"
        )
    if (partitioner == "natural") != (groups is not None):
        raise PartitionError(
            "data.partitioner = \"natural\" and data.scenario = \"client-folders\" go together: the natural "
            "partition is each client's own folder" + ("" if groups is None else "; set data.partitioner = \"natural\""))
    if groups is not None and len(np.unique(groups)) != num_partitions:
        raise PartitionError(f"{len(np.unique(groups))} client folders but clients = {num_partitions}: set clients "
                             "to the number of folders")
    rows = np.random.default_rng(seed).permutation(len(labels))
    columns = {"index": rows.tolist(), "label": labels[rows].tolist()}
    if groups is not None:
        columns["group"] = groups[rows].tolist()
    from datasets import Dataset

    ds = Dataset.from_dict(columns)
    part = PARTITIONERS.get(partitioner)(num_partitions, alpha, min_size, seed)
    part.dataset = ds
    try:
        parts = [np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)]
    except ValueError as err:
        raise PartitionError(
            f"the {partitioner} partitioner (alpha={alpha}, seed={seed}) could not give each of "
            f"{num_partitions} clients at least {min_size} images: {err}. Fix: raise data.alpha, "
            "lower data.min-partition-size or clients, or change seed"
        ) from None
    for i, p in enumerate(parts):
        if len(p) < max(min_size, 1):
            raise PartitionError(
                f"client {i} got {len(p)} images from the {partitioner} partitioner (alpha={alpha}, "
                f"seed={seed}); at least {max(min_size, 1)} are needed. Fix: raise data.alpha, "
                "lower clients, or change seed"
            )
    return parts
