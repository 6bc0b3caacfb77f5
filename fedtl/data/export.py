"""A dry run of a deployment: a built-in scenario's partitions written out as node data folders.

Each partition becomes ``<out>/node-<i>/train/<class>/*.png`` and ``.../test/<class>/*.png``,
the images exactly as the simulated client ``i`` holds them (its style applied), so a
deployment over these folders can be checked against the simulation of the same partitions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fedtl.config import ConfigError, ExperimentConfig
from fedtl.data.federated import check_partitions, client_data, client_test_data, task
from fedtl.data.node_files import DATA_ON_NODES


def save_images(x: torch.Tensor, y: torch.Tensor, folder: Path, names: list[str]) -> None:
    """Images as 8-bit PNGs in ``folder/<class name>/``; every class gets a folder, empty or not, so that
    a node's sorted class folders are the run's classes.

    Parameters
    ----------
    x : torch.Tensor
        N x C x H x W images in [0, 1] (C = 1: grey PNGs, 3: RGB).
    y : torch.Tensor
        Their labels, indices into ``names``.
    folder : Path
        Where the class folders go (created).
    names : list of str
        The class names, in label order.
    """
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, (img, label) in enumerate(zip(arr, y.tolist(), strict=True)):
        grey = img.shape[-1] == 1
        image = Image.fromarray(img[..., 0] if grey else img, "L" if grey else "RGB")
        image.save(folder / names[label] / f"{i:05d}.png")


def export_partitions(cfg: ExperimentConfig, out: str | Path) -> list[Path]:
    """Write each of ``cfg.clients`` partitions of ``cfg``'s scenario as a node's data folder.

    Class folders are named ``00``, ``01``, ... so that they sort in label order.

    Parameters
    ----------
    cfg : ExperimentConfig
        The run whose partitions to write (its data section, ``clients`` and ``seed``).
    out : str or Path
        The folder to write ``node-<i>/`` into.

    Returns
    -------
    list of Path
        Each partition's folder, in partition order.

    Raises
    ------
    ConfigError
        If the scenario is text, or has no client data (``"nodes"``).
    PartitionError
        If the split would leave a client without data.
    FileExistsError
        If a node folder is already there (the images would mix).
    """
    if cfg.data.scenario in DATA_ON_NODES:
        raise ConfigError(f"data.scenario = {cfg.data.scenario!r} keeps its client data on the nodes: there are no "
                          "partitions to export (pick a built-in scenario for a dry run)")
    t = task(cfg.data)
    if t.tokens:
        raise ConfigError(f"data.scenario = {cfg.data.scenario!r} is text: node folders hold images")
    check_partitions(cfg.data, cfg.clients, cfg.seed)
    names = [f"{c:02d}" for c in range(t.num_classes)]
    folders = []
    for pid in range(cfg.clients):
        folder = Path(out) / f"node-{pid}"
        if folder.exists():
            raise FileExistsError(f"{folder} exists: export into an empty folder")
        train = client_data(cfg.data, pid, cfg.clients, cfg.seed)
        test = client_test_data(cfg.data, pid, cfg.clients, cfg.seed)
        save_images(train.x, train.y, folder / "train", names)
        save_images(test.x, test.y, folder / "test", names)
        folders.append(folder)
    return folders
