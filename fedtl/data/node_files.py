"""Data that lives on the nodes: each SuperNode reads its own files, named in its node config.

In a deployment every SuperNode is started with ``--node-config "data-path='/its/data'"``;
the server is never given the path. The files are one of

- an image folder: ``<path>/<class>/<image>``, or ``<path>/train/<class>/...`` and
  ``<path>/test/<class>/...`` when the node keeps its own test images apart;
- an ``.npz`` file: ``x`` (``N x H x W`` or ``N x C x H x W``; uint8 0-255 or float 0-1)
  and ``y`` (integer labels), optionally ``x_test`` and ``y_test``.

Without a test split of its own, a node's last ``data.client-test-fraction`` (a fixed
share, stratified where every class can give to both sides) is its test set, as a
simulated client's is. Labels index ``data.classes``
(comma-separated class names), or a folder's class subfolders sorted.

The ``"nodes"`` scenario is the server's side of such a run: the task's shape comes from
the config (``data.classes``, ``data.channels``) and the server's own test set from
``data.path`` (either layout above); no client data is on the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from fedtl.config import DataConfig
from fedtl.data.rows import LabelledImages
from fedtl.data.scenarios import SCENARIOS, Scenario
from fedtl.data.sources import SPLIT_SEED, read_folder
from fedtl.data.store import Writer, files_fingerprint, open_arrays
from fedtl.errors import DataError
from fedtl.protocol import DATA_PATH
from fedtl.registry import Registry


@dataclass(frozen=True)
class Task:
    """What a model needs to know of the data: its classes, its input channels, images or token ids."""

    num_classes: int
    in_channels: int
    tokens: bool = False

    @classmethod
    def of(cls, sc: Scenario) -> Task:
        """The task of a loaded scenario."""
        return cls(sc.num_classes, sc.in_channels, sc.pool_x.dim() == 2)


def class_names(cfg: DataConfig) -> list[str] | None:
    """``data.classes`` as a list, or ``None`` when unset."""
    names = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    return names or None


# -- reading a node's files: one reader per layout ------------------------------------------
Split = tuple[torch.Tensor, torch.Tensor]
Reader = Callable[[Path, DataConfig, Task], tuple[Split, Split | None]]
LAYOUTS: Registry[Reader] = Registry("node data layout")


def _fit(x: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    # Any stored size and channel count to the run's: resized, grey repeated to RGB or RGB to grey.
    if x.shape[-1] != size or x.shape[-2] != size:
        x = TF.resize(x, [size, size], antialias=True)
        x = x if x.dtype == torch.uint8 else x.clamp(0.0, 1.0)
    if x.shape[1] == channels:
        return x
    return x.repeat(1, 3, 1, 1) if channels == 3 else TF.rgb_to_grayscale(x)


@LAYOUTS.register("folder")
def _folder(path: Path, cfg: DataConfig, task: Task) -> tuple[Split, Split | None]:
    split = (path / "train").is_dir() and (path / "test").is_dir()
    root = path / "train" if split else path
    grey = task.in_channels == 1
    # Without data.classes, read_folder labels by the folder's own class subfolders, sorted: all of the model's.
    x, y, names, _ = read_folder(root, cfg.image_size, bad_images=cfg.bad_images, classes=class_names(cfg), grey=grey)
    if len(names) != task.num_classes:
        raise DataError(
            f"{root} has {len(names)} class folders ({', '.join(names[:6])}) but the model has {task.num_classes} "
            "classes: name them all, in label order, in data.classes (e.g. --run-config \"data.classes='a,b,c'\"), "
            "or give the node a folder for every class (empty ones too)")
    test = None
    if split:
        tx, ty, _, _ = read_folder(path / "test", cfg.image_size, bad_images=cfg.bad_images, classes=names, grey=grey)
        test = (tx, ty)
    return (x, y), test


def _npz_images(a: np.ndarray, file: Path, key: str) -> torch.Tensor:
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise DataError(f"{file}: {key!r} has shape {a.shape}; expected N x H x W or N x C x H x W with C = 1 or 3")
    x = torch.from_numpy(np.ascontiguousarray(a))
    return x if x.dtype == torch.uint8 else x.float()  # 8-bit images stay 8-bit (scaled per batch)


@LAYOUTS.register(".npz")
def _npz(path: Path, cfg: DataConfig, task: Task) -> tuple[Split, Split | None]:
    try:
        with np.load(path, allow_pickle=False) as z:  # never unpickle a file's objects
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable .npz file ({err})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path} has no {missing} array(s) (it holds {sorted(arrays)}): save images as 'x' and "
                        "labels as 'y' (np.savez(path, x=..., y=...))")

    def split(xk: str, yk: str) -> Split:
        x = _fit(_npz_images(arrays[xk], path, xk), cfg.image_size, task.in_channels)
        y = torch.from_numpy(np.asarray(arrays[yk]).astype(np.int64).reshape(-1))
        if len(y) != len(x):
            raise DataError(f"{path}: {xk!r} holds {len(x)} images but {yk!r} {len(y)} labels")
        return x, y

    test = split("x_test", "y_test") if "x_test" in arrays and "y_test" in arrays else None
    return split("x", "y"), test


@dataclass(frozen=True)
class NodeImages:
    """A node's labelled images for training and its own test images (rows of its data store entry)."""

    train: LabelledImages
    test: LabelledImages


def _node_key(path: Path, cfg: DataConfig, task: Task) -> dict[str, object]:
    return {"kind": "node-data", "path": str(path.resolve()), "files": files_fingerprint([path]),
            "size": cfg.image_size, "channels": task.in_channels, "classes": cfg.classes, "bad": cfg.bad_images}


def _read(path: Path, cfg: DataConfig, task: Task, w: Writer) -> dict[str, object]:
    layout = "folder" if path.is_dir() else path.suffix
    if layout not in LAYOUTS:
        raise DataError(f"{DATA_PATH} {str(path)!r} is neither a folder nor one of "
                        f"{[n for n in LAYOUTS if n != 'folder']}")
    (x, y), test = LAYOUTS.get(layout)(path, cfg, task)
    labels = torch.cat([y, test[1]]) if test is not None else y
    bad = sorted({v for v in labels.tolist() if not 0 <= v < task.num_classes})
    if bad:
        raise DataError(f"{DATA_PATH} {str(path)!r} has labels {bad[:5]} outside the model's {task.num_classes} classes")
    w.put("x", x.contiguous())
    w.put("y", y)
    if test is not None:
        w.put("x_test", test[0].contiguous())
        w.put("y_test", test[1])
    return {}


@lru_cache(maxsize=2)
def read_node_data(path: str, cfg: DataConfig, task: Task) -> NodeImages:
    """A node's own data at ``path``, labelled as the run's ``task`` says, from this machine's data store
    (``data.store-dir``, or the node config's ``store-dir``): decoded once, mapped by every process after.

    Parameters
    ----------
    path : str
        An image folder or an ``.npz`` file (see the module's docstring).
    cfg : DataConfig
        Image size, ``classes``, ``bad-images``, ``client-test-fraction`` and ``labelled-per-client``
        (at most that many training images are kept; 0: all).
    task : Task
        The run's classes and channels.

    Raises
    ------
    DataError
        If the path is missing or unreadable, its layout unknown, or a label outside the task's classes.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{DATA_PATH} {path!r} does not exist on this node")
    stored = open_arrays(cfg.store_dir, _node_key(p, cfg, task), lambda w: _read(p, cfg, task, w))
    a = stored.arrays
    x, y = a["x"], a["y"]
    keep = np.arange(len(y))
    if "y_test" in a:
        test = LabelledImages(a["x_test"], a["y_test"], ("own",) * len(a["y_test"]), source=f"{stored.key}/test")
    else:
        keep, held = _own_test_split(y.numpy(), cfg.client_test_fraction)
        test = _items(x, y, held, f"{stored.key}")
    cap = cfg.labelled_per_client
    keep = keep[:cap] if cap > 0 else keep
    if not len(keep):
        raise DataError(f"{DATA_PATH} {path!r} holds no training images")
    return NodeImages(_items(x, y, keep, stored.key), test)


def _items(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, source: str) -> LabelledImages:
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return LabelledImages(x, y[idx], ("own",) * len(idx), index=idx, source=source)


def _own_test_split(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(len(y))
    n_test = min(int(len(y) * fraction), len(y) - 1)
    if n_test < 1:
        return idx, idx[:0]
    from sklearn.model_selection import train_test_split  # only where a split is built

    try:  # stratified where every class can give its share to both sides
        keep, held = train_test_split(idx, test_size=n_test, random_state=SPLIT_SEED, stratify=y)
    except ValueError:  # a class too small for that: a plain fixed split
        keep, held = train_test_split(idx, test_size=n_test, random_state=SPLIT_SEED)
    return keep, held


# -- the server's side ------------------------------------------------------------------------
def nodes_task(cfg: DataConfig) -> Task:
    """The ``"nodes"`` scenario's task, from the config alone (no data read).

    Raises
    ------
    DataError
        If ``data.classes`` is unset.
    """
    names = class_names(cfg)
    if names is None:
        raise DataError("data.scenario = \"nodes\" needs data.classes: the class names, comma-separated in label "
                        "order (e.g. data.classes = \"benign,malignant\"), so that the server and every node agree")
    return Task(len(names), cfg.channels)


@SCENARIOS.register("nodes")
def nodes_scenario(cfg: DataConfig) -> Scenario:
    """The server's view of a deployment whose data lives on the nodes: no pool, no source data,
    the server's own test set from ``data.path`` (an image folder or ``.npz``; a folder's
    ``test/`` subfolder if it has one)."""
    task = nodes_task(cfg)
    if not cfg.path:
        raise DataError("data.scenario = \"nodes\" needs data.path on the server: its own labelled test images (an "
                        "image folder or .npz), on which it evaluates the global model each round")
    images = read_node_data(cfg.path, replace(cfg, client_test_fraction=0.0, labelled_per_client=0), task)
    held = images.test if len(images.test) else images.train
    tx, ty = held.rows[held.row_ids()], held.y
    empty_x = torch.zeros(0, task.in_channels, cfg.image_size, cfg.image_size, dtype=tx.dtype)
    empty_y = torch.zeros(0, dtype=torch.long)
    return Scenario(task.num_classes, 0, task.in_channels, ("clean",), empty_x, empty_y, empty_x, empty_y, tx, ty)


# Scenarios whose client data lives on the nodes. Each gives its task from the config alone, so that
# a node builds the model without reading the server's data.
DATA_ON_NODES: Registry[Callable[[DataConfig], Task]] = Registry("scenario with data on the nodes")
DATA_ON_NODES.register("nodes")(nodes_task)
