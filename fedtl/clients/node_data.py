"""A node's own data, chosen by what its node config holds.

One code path for simulation and deployment: a node whose config names ``data-path``
(a deployed SuperNode, ``--node-config "data-path='/its/data'"``) reads that, and only
that; a node with a ``partition-id`` (every simulated node, or a deployed one in a dry
run) derives its partition of the run's scenario. The first source whose key the node
config holds wins, so a deployed node never falls back to the server's data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import Context

from fedtl.config import ExperimentConfig
from fedtl.data.federated import LabelledImages, client_data, client_test_data, task
from fedtl.data.node_files import DATA_ON_NODES, read_node_data
from fedtl.errors import DataError
from fedtl.protocol import DATA_PATH, HELD_OUT, NUM_PARTITIONS, PARTITION_ID, STORE_DIR


@dataclass(frozen=True)
class NodeData:
    """What a node trains and tests on, and how it shows up in metrics and seeds.

    Attributes
    ----------
    train, test : callable
        Its labelled training images and its own test images, read when called (cached per process: a
        simulated client keeps them between rounds; a deployed node starts a process per message).
    held_out : bool
        Kept out of training (it only adapts the final model, for the adaptability figures).
    key : str
        This node in seed streams: its partition id, or ``node-<node id>``.
    metrics : dict
        What identifies it in its replies' metrics (``partition-id`` where it has one).
    """

    train: Callable[[], LabelledImages]
    test: Callable[[], LabelledImages]
    held_out: bool
    key: str
    metrics: dict[str, int]


def node_partition(context: Context, cfg: ExperimentConfig) -> tuple[int, int]:
    """This node's partition id and the number of partitions, checked against the run's config.

    Raises
    ------
    ValueError
        If the node config's ``num-partitions`` is not the run's ``clients``.
    """
    pid, n = int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    if n != cfg.clients:
        raise ValueError(
            f"this node is partition {pid} of {n} (node config) but the run config says clients = {cfg.clients}: "
            f"set clients = {n} (e.g. --run-config \"clients={n}\") so the data is split as the nodes are"
        )
    return pid, n


def _partition(context: Context, cfg: ExperimentConfig) -> NodeData:
    pid, n = node_partition(context, cfg)
    if cfg.data.scenario in DATA_ON_NODES:
        raise DataError(f"node {context.node_id} is partition {pid}, but data.scenario = {cfg.data.scenario!r} has no "
                        "client data to partition: start each SuperNode with its own data, --node-config "
                        "\"data-path='/path/to/its/data'\"")
    return NodeData(
        train=lambda: client_data(cfg.data, pid, n, cfg.seed),
        test=lambda: client_test_data(cfg.data, pid, n, cfg.seed),
        held_out=pid >= cfg.clients - cfg.data.held_out_clients,
        key=str(pid), metrics={PARTITION_ID: pid},
    )


def _data_path(context: Context, cfg: ExperimentConfig) -> NodeData:
    path = str(context.node_config[DATA_PATH])
    # The node's own store folder if its config names one; else the run's, relative to its working folder.
    data = dataclasses.replace(cfg.data, store_dir=str(context.node_config.get(STORE_DIR, cfg.data.store_dir)))

    def read(split: int) -> LabelledImages:
        try:
            images = read_node_data(path, data, task(cfg.data))
        except DataError as err:  # named by node, so the server's log says whose data is wrong
            raise DataError(f"node {context.node_id}: {err}. Fix the node's --node-config \"{DATA_PATH}=...\" "
                            "and restart its SuperNode") from None
        return (images.train, images.test)[split]

    return NodeData(train=lambda: read(0), test=lambda: read(1), held_out=_flag(context.node_config.get(HELD_OUT)),
                    key=f"node-{context.node_id}", metrics={})


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes") if value is not None else False


# The node config key that selects each source, in the order they are tried.
SOURCES: tuple[tuple[str, Callable[[Context, ExperimentConfig], NodeData]], ...] = (
    (DATA_PATH, _data_path),
    (PARTITION_ID, _partition),
)


def node_data(context: Context, cfg: ExperimentConfig) -> NodeData:
    """This node's data: ``data-path`` from its node config if there, else its ``partition-id``.

    Raises
    ------
    DataError
        If the node config names neither (or names a partition of a scenario without client data).
    ValueError
        If the node's partition does not fit the run's config.
    """
    for key, source in SOURCES:
        if key in context.node_config:
            return source(context, cfg)
    raise DataError(f"node {context.node_id} has neither {DATA_PATH!r} nor {PARTITION_ID!r} in its node config "
                    f"(keys: {sorted(context.node_config)}): start its SuperNode with --node-config "
                    f"\"{DATA_PATH}='/path/to/its/data'\"")
