"""Each client's labelled data and the server's test set, derived deterministically.

The split is a deterministic function of the config, so no data ever has to be shipped:
the first process of a machine to need it (the one that prepares the run) computes it with
flwr-datasets' partitioners and keeps it in the data store, and every other process maps it.
The scenario's arrays are the machine's data store, mapped; a client's data is its
partition's row numbers into them (``LabelledImages``), and only the rows a batch needs
are ever read.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedtl.config import ConfigError, DataConfig
from fedtl.data.canaries import canary_images, with_canaries
from fedtl.data.node_files import DATA_ON_NODES, Task
from fedtl.data.rows import PLAIN_STYLES, LabelledImages
from fedtl.data.scenarios import Scenario, load_scenario
from fedtl.data.store import Writer, open_arrays
from fedtl.seeds import derived_seed

__all__ = ["LabelledImages", "check_partitions", "client_data", "client_test_data", "scenario", "server_test_data",
           "source_data", "task", "verify_store"]

# The data settings that decide a split (beside the scenario, the number of clients and the seed).
_SPLIT_FIELDS = ("partitioner", "alpha", "min_partition_size", "client_test_fraction", "labelled_per_client")


@lru_cache(maxsize=4)
def scenario(cfg: DataConfig) -> Scenario:
    """The scenario of ``cfg``: built into the data store once per machine, mapped once per process."""
    return load_scenario(cfg)


def verify_store(cfg: DataConfig) -> None:
    """Build ``cfg``'s scenario in the data store if needed, and check its files' hashes (rebuilding a damaged
    entry): once, by the process that prepares a run, before any client maps it."""
    load_scenario(cfg, verify=True)


def _split(cfg: DataConfig, num_clients: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    # Each partition: its last client-test-fraction is the client's own test split; of the
    # rest, the client keeps at most labelled-per-client images for training.
    from fedtl.data.partition import partition_indices  # flwr-datasets: only where a split is built

    sc = scenario(cfg)
    parts = partition_indices(
        sc.pool_y.numpy(), num_clients, partitioner=cfg.partitioner, alpha=cfg.alpha,
        min_size=cfg.min_partition_size, seed=seed,
        groups=sc.pool_groups.numpy() if sc.pool_groups is not None else None,
    )
    out = []
    for p in parts:
        n_test = min(int(len(p) * cfg.client_test_fraction), len(p) - 1)
        train, test = p[:len(p) - n_test], p[len(p) - n_test:]
        cap = cfg.labelled_per_client
        out.append((train[:cap] if cap > 0 else train, test))
    return out


def _write_split(parts: list[tuple[np.ndarray, np.ndarray]], w: Writer) -> dict[str, Any]:
    for k, name in enumerate(("train", "test")):
        rows = [p[k] for p in parts]
        w.put(f"{name}_rows", np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64))
        w.put(f"{name}_ends", np.cumsum([len(r) for r in rows], dtype=np.int64))
    return {"clients": len(parts)}


@lru_cache(maxsize=8)
def _partitions(cfg: DataConfig, num_clients: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    # The split is computed once per machine (by the process that prepares a run) and kept in the store
    # beside the scenario, so a client process maps its rows without importing flwr-datasets.
    key = {"kind": "partition", "scenario": scenario(cfg).key, "clients": num_clients, "seed": seed,
           **{k: getattr(cfg, k) for k in _SPLIT_FIELDS}}
    a = open_arrays(cfg.store_dir, key, lambda w: _write_split(_split(cfg, num_clients, seed), w)).arrays
    train, test = (np.split(a[f"{n}_rows"].numpy(), a[f"{n}_ends"].numpy()[:-1]) for n in ("train", "test"))
    return tuple(zip(train, test, strict=True))


def task(cfg: DataConfig) -> Task:
    """The classes and input channels a model for ``cfg`` needs: from the config where the scenario
    says them (``"nodes"``: a node never reads the server's data), else from the loaded scenario."""
    return DATA_ON_NODES.get(cfg.scenario)(cfg) if cfg.scenario in DATA_ON_NODES else Task.of(scenario(cfg))


def check_partitions(cfg: DataConfig, num_clients: int, seed: int) -> None:
    """Raise ``PartitionError`` now if the split would leave a client without data."""
    _partitions(cfg, num_clients, seed)


def _client_images(cfg: DataConfig, partition_id: int, num_clients: int, seed: int, split: int) -> LabelledImages:
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_clients}): check the node config")
    sc = scenario(cfg)
    idx = torch.from_numpy(_partitions(cfg, num_clients, seed)[partition_id][split])
    style = sc.styles[partition_id % len(sc.styles)]
    # Each item's style draws from its own seed: the same input in every batch, epoch and process.
    seeds = () if style in PLAIN_STYLES else tuple(derived_seed(f"style:{partition_id}:{int(r)}", seed) for r in idx)
    return LabelledImages(sc.pool_x, sc.pool_y[idx], (style,) * len(idx), index=idx, seeds=seeds, source=sc.key)


@lru_cache(maxsize=2)
def client_data(cfg: DataConfig, partition_id: int, num_clients: int, seed: int) -> LabelledImages:
    """The labelled images client ``partition_id`` trains on (at most ``labelled-per-client``), in its style.

    Parameters
    ----------
    cfg : DataConfig
        The data section of the experiment.
    partition_id : int
        This client's index in ``[0, num_clients)``.
    num_clients : int
        Number of clients the target pool is split across.
    seed : int
        Seed of the split and of the style's randomness.

    Notes
    -----
    Row numbers into the mapped scenario, not images: training reads its batches' rows. The client of
    ``data.canary-client`` also trains on the canaries ``data.canaries`` names, after its own images.
    """
    images = _client_images(cfg, partition_id, num_clients, seed, 0)
    if cfg.canaries and partition_id == cfg.canary_client:  # the privacy audit's (fedtl.data.canaries)
        sc = scenario(cfg)
        planted = canary_images(cfg.canaries, shape=tuple(sc.pool_x.shape[1:]), num_classes=sc.num_classes)
        images = with_canaries(images, planted)
    return images


@lru_cache(maxsize=2)
def client_test_data(cfg: DataConfig, partition_id: int, num_clients: int, seed: int) -> LabelledImages:
    """Client ``partition_id``'s own held-out images (the last ``client-test-fraction`` of its partition).

    They never train; the client's accuracy of a model is measured on them. Same
    parameters as ``client_data``.
    """
    return _client_images(cfg, partition_id, num_clients, seed, 1)


@lru_cache(maxsize=2)
def server_test_data(cfg: DataConfig) -> LabelledImages:
    """The server's held-out target test set; image ``j`` is in style ``styles[j % n]``."""
    sc = scenario(cfg)
    n = len(sc.styles)
    styles = tuple(sc.styles[j % n] for j in range(len(sc.test_y)))
    plain = all(s in PLAIN_STYLES for s in sc.styles)
    seeds = () if plain else tuple(derived_seed(f"test-style:{j}", 0) for j in range(len(styles)))
    return LabelledImages(sc.test_x, sc.test_y, styles, seeds=seeds, source=sc.key)


def source_data(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clean source images, labels and number of source classes (for pre-training).

    Raises
    ------
    ConfigError
        If the scenario has no source data (real data sets): the backbone needs outside weights.
    """
    sc = scenario(cfg)
    if len(sc.source_y) == 0:
        raise ConfigError(
            f"data.scenario = {cfg.scenario!r} has no source data for fedtl to pre-train a backbone on: set "
            "model.weights (torchvision's published weights, e.g. \"IMAGENET1K_V1\") or model.weights-path (a "
            "local state dict), or init = \"scratch\"")
    return sc.source_x, sc.source_y, sc.source_classes
