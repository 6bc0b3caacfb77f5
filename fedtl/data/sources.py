"""Real data sets as scenarios: torchvision's, image folders, and saved Hugging Face data sets.

Each reads local files only (torchvision downloads only with ``data.download = true``),
decodes every image to ``data.image-size`` pixels as ``uint8`` (once per machine: the
scenario goes into the data store, ``fedtl.data.store``), and returns a ``Scenario``
without source data: a backbone for these comes with outside weights (``model.weights`` /
``model.weights-path``) or is trained from scratch. Grey data stays one channel (RGB
backbones repeat it); anything else becomes RGB.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fedtl.config import DataConfig
from fedtl.data.scenarios import DIGIT_STYLES, SCENARIOS, Scenario
from fedtl.errors import DataError
from fedtl.registry import Registry

log = logging.getLogger(__name__)
# The pool/test split of a data set without a test split is fixed: every run is scored alike.
SPLIT_SEED = 2024


def to_tensor(img: Image.Image, size: int, grey: bool) -> torch.Tensor:
    """One PIL image as a ``(C, size, size)`` uint8 tensor (C = 1 if ``grey`` else 3), resized with antialiasing."""
    img = img.convert("L" if grey else "RGB")
    return TF.resize(TF.to_image(img), [size, size], antialias=True)


def stack(images: Iterable[Image.Image], size: int, grey: bool, count: int | None = None) -> torch.Tensor:
    """Images as one ``(N, C, size, size)`` uint8 tensor, each converted as it comes (``count``: N, when known,
    so no list of decoded images is ever held)."""
    shape = (1 if grey else 3, size, size)
    if count is None:
        out = [to_tensor(img, size, grey) for img in images]
        return torch.stack(out) if out else torch.zeros(0, *shape, dtype=torch.uint8)
    x = torch.empty(count, *shape, dtype=torch.uint8)
    for i, img in enumerate(images):
        x[i] = to_tensor(img, size, grey)
    return x


def finish_scenario(cfg: DataConfig, classes: int, pool: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor] | None, groups: torch.Tensor | None = None) -> Scenario:
    """A scenario without source data from a pool and a test split (``None``: a fixed stratified
    ``test-fraction`` of the pool). Images or token ids alike; ``groups``: each pool item's client.

    Raises
    ------
    DataError
        If the test split has labels outside ``classes``.
    """
    x, y = pool
    if test is None:  # no test split of its own: a fixed stratified share of the pool
        idx = np.arange(len(y))
        strat = y.numpy() if np.bincount(y.numpy()).min(initial=2) >= 2 else None
        from sklearn.model_selection import train_test_split  # only where a split is built

        keep, held = train_test_split(idx, test_size=cfg.test_fraction, random_state=SPLIT_SEED, stratify=strat)
        x, y, test = x[keep], y[keep], (x[held], y[held])
        groups = groups[keep] if groups is not None else None
    tx, ty = test
    bad = sorted(set(ty.tolist()) - set(range(classes)))
    if bad:
        raise DataError(f"the test split has labels {bad[:5]} outside the {classes} classes of the training data: "
                        "every test class must also be a training class (same class folders / label names)")
    images = x.dim() == 4  # (N, C, S, S) images; token ids are (N, length)
    if cfg.domain_skew and not images:
        raise DataError("data.domain-skew restyles images; this data set is text")
    styles = DIGIT_STYLES if cfg.domain_skew else ("clean",)
    empty = x[:0]
    return Scenario(classes, 0, x.shape[1] if images else 1, styles, empty, torch.zeros(0, dtype=torch.long),
                    x, y, tx, ty, groups)


# -- torchvision data sets ------------------------------------------------------------
# name -> (dataset class, is grey, how to ask for the train and the test split; None: no test split)
_Split = dict[str, Any]
TV_DATASETS: Registry[tuple[type, bool, _Split, _Split | None]] = Registry("torchvision data set")
for _name, _grey in (("CIFAR10", False), ("CIFAR100", False), ("MNIST", True), ("FashionMNIST", True),
                     ("KMNIST", True)):
    TV_DATASETS.register(_name)((getattr(tvd, _name), _grey, {"train": True}, {"train": False}))
for _name in ("SVHN", "GTSRB", "Food101", "DTD"):
    TV_DATASETS.register(_name)((getattr(tvd, _name), False, {"split": "train"}, {"split": "test"}))
TV_DATASETS.register("Flowers102")((tvd.Flowers102, False, {"split": "train"}, {"split": "test"}))
TV_DATASETS.register("STL10")((tvd.STL10, False, {"split": "train"}, {"split": "test"}))
TV_DATASETS.register("EuroSAT")((tvd.EuroSAT, False, {}, None))


def _labels(ds: Any) -> list[int]:
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return [int(v) for v in getattr(ds, attr)]
    return [int(ds[i][1]) for i in range(len(ds))]


def _decode(ds: Any, size: int, grey: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = (ds[i][0] for i in range(len(ds)))
    return stack(images, size, grey, count=len(ds)), torch.tensor(_labels(ds), dtype=torch.long)


@SCENARIOS.register("torchvision")
def torchvision_data(cfg: DataConfig) -> Scenario:
    """``data.dataset`` (e.g. ``"CIFAR10"``) read by torchvision's own class from ``data.root``."""
    if not cfg.dataset or not cfg.root:
        raise DataError("data.scenario = \"torchvision\" needs data.dataset (one of "
                        f"{', '.join(TV_DATASETS.names())}) and data.root (the folder torchvision reads it from)")
    cls, grey, train, test = TV_DATASETS.get(cfg.dataset)
    if not cfg.verify_checksums and hasattr(cls, "_check_integrity"):
        # The class's own reader, without comparing the files' MD5 sums to the published archive's.
        attrs: dict[str, Any] = {"_check_integrity": lambda self: True}
        if isinstance(getattr(cls, "meta", None), dict):
            attrs["meta"] = {**cls.meta, "md5": None}  # check_integrity without a sum: the file must exist
        cls = type(cls.__name__, (cls,), attrs)
    try:
        pool = cls(cfg.root, download=cfg.download, **train)
        held = cls(cfg.root, download=cfg.download, **test) if test is not None else None
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"{cfg.dataset} is not in data.root = {cfg.root!r} ({err}). Put torchvision's files there, "
                        "or set data.download = true on a machine that is online") from None
    classes = len(getattr(pool, "classes", [])) or max(_labels(pool)) + 1
    return finish_scenario(cfg, classes, _decode(pool, cfg.image_size, grey),
                     _decode(held, cfg.image_size, grey) if held is not None else None)


# -- image folders --------------------------------------------------------------------
def read_folder(path: str | Path, size: int, *, bad_images: str, classes: Sequence[str] | None = None,
                grey: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str], bool]:
    """Images of a class-per-subfolder folder: ``(x, y, class names, grey)``.

    Parameters
    ----------
    path : str or Path
        ``path/<class>/<image>`` (png, jpg, ... as torchvision's ImageFolder reads).
    size : int
        Side of the square images returned.
    bad_images : str
        ``"skip"`` (logged with a count) or ``"error"`` for files PIL cannot decode.
    classes : sequence of str, optional
        The class names labels index; default: this folder's subfolders, sorted.
    grey : bool, optional
        One channel or RGB; default: grey only if every image is.

    Raises
    ------
    DataError
        A missing or empty folder, a class not in ``classes``, or (``"error"``) a corrupt image.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {str(path)!r} does not exist (expected {path}/<class>/<images>)")
    try:
        found, _ = find_classes(str(path))
    except FileNotFoundError:
        raise DataError(f"image folder {str(path)!r} has no class subfolders (expected {path}/<class>/<images>)") from None
    names = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"image folder {str(path)!r} has classes {unknown[:5]} outside the run's classes {names[:10]}")
    files = make_dataset(str(path), {c: names.index(c) for c in found}, extensions=IMG_EXTENSIONS,
                         allow_empty=True)
    # Two passes, so no decoded image is held: the headers (modes) first, then each image decoded and
    # resized straight into its row.
    readable, modes, skipped = [], [], []
    for file, label in files:
        try:
            with Image.open(file) as img:
                modes.append(img.mode)
            readable.append((file, label))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
            skipped.append(_bad(file, err, bad_images))
    if grey is None:
        grey = bool(modes) and all(m in ("L", "1", "I;16", "I") for m in modes)
    x = torch.empty(len(readable), 1 if grey else 3, size, size, dtype=torch.uint8)
    labels, n = [], 0
    for file, label in readable:
        try:
            with Image.open(file) as img:
                x[n] = to_tensor(img, size, grey)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:  # a header that reads, a body that does not
            skipped.append(_bad(file, err, bad_images))
            continue
        labels.append(label)
        n += 1
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s, e.g. %s", len(skipped), path, skipped[0])
    if not n:
        raise DataError(f"image folder {str(path)!r} holds no readable image ({len(skipped)} skipped)")
    return x[:n], torch.tensor(labels, dtype=torch.long), names, grey


def _bad(file: str, err: Exception, bad_images: str) -> str:
    if bad_images == "error":
        raise DataError(f"{file} is not a readable image ({err}); remove it, or set data.bad-images = \"skip\"") from None
    return file


@SCENARIOS.register("image-folder")
def image_folder(cfg: DataConfig) -> Scenario:
    """``data.path``: class subfolders (split into pool and test), or ``train/`` and ``test/`` holding them."""
    if not cfg.path:
        raise DataError("data.scenario = \"image-folder\" needs data.path (a folder of class subfolders)")
    root = Path(cfg.path)
    split = (root / "train").is_dir() and (root / "test").is_dir()
    x, y, names, grey = read_folder(root / "train" if split else root, cfg.image_size, bad_images=cfg.bad_images)
    test = None
    if split:
        tx, ty, _, _ = read_folder(root / "test", cfg.image_size, bad_images=cfg.bad_images, classes=names, grey=grey)
        test = (tx, ty)
    return finish_scenario(cfg, len(names), (x, y), test)


@SCENARIOS.register("client-folders")
def client_folders(cfg: DataConfig) -> Scenario:
    """``data.path/<client>/<class>/<image>``: one image folder per silo (sorted: client i is the i-th),
    partitioned as they are (``data.partitioner = "natural"``); ``data.path/test/`` (class subfolders),
    if there, is the server's test set, else a stratified ``test-fraction`` of the pool."""
    root = Path(cfg.path)
    if not cfg.path or not root.is_dir():
        raise DataError(f"data.scenario = \"client-folders\" needs data.path, a folder of client folders (not found: "
                        f"{cfg.path!r})")
    silos = sorted(d for d in root.iterdir() if d.is_dir() and d.name != "test")
    if not silos:
        raise DataError(f"{root} holds no client folders (expected {root}/<client>/<class>/<images>)")
    names = sorted({c for d in silos for c in find_classes(str(d))[0]})
    grey = None
    for _ in range(2):  # a second pass in RGB when the silos disagree on grey
        reads = [read_folder(d, cfg.image_size, bad_images=cfg.bad_images, classes=names, grey=grey) for d in silos]
        if len({r[3] for r in reads}) == 1:
            break
        grey = False
    x = torch.cat([r[0] for r in reads])
    y = torch.cat([r[1] for r in reads])
    groups = torch.cat([torch.full((len(r[1]),), i) for i, r in enumerate(reads)])
    test = None
    if (root / "test").is_dir():
        tx, ty, _, _ = read_folder(root / "test", cfg.image_size, bad_images=cfg.bad_images, classes=names,
                                   grey=reads[0][3])
        test = (tx, ty)
    return finish_scenario(cfg, len(names), (x, y), test, groups)


# -- Hugging Face data sets -------------------------------------------------------------
def _hf_split(ds: Any, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    missing = [c for c in (cfg.image_column, cfg.label_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"the data set at {cfg.path!r} has no column(s) {missing}; its columns are "
                        f"{ds.column_names}: set data.image-column / data.label-column")
    grey = all(getattr(img, "mode", "RGB") in ("L", "1") for img in ds.select(range(min(64, len(ds))))[cfg.image_column])
    images = (row[cfg.image_column] for row in ds)  # one decoded image at a time
    return stack(images, cfg.image_size, grey, count=len(ds)), torch.tensor(ds[cfg.label_column], dtype=torch.long)


@SCENARIOS.register("hf-dataset")
def hf_dataset(cfg: DataConfig) -> Scenario:
    """A Hugging Face image data set from ``data.path``: saved with ``save_to_disk``, or a local folder
    ``datasets.load_dataset`` reads (parquet, imagefolder); its ``train`` split is the pool, ``test``
    (if any) the server's test set."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if not cfg.path or not Path(cfg.path).exists():
        raise DataError(f"data.scenario = \"hf-dataset\" needs data.path, a local data set folder (not found: "
                        f"{cfg.path!r})")
    path = Path(cfg.path)
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    data = load_from_disk(str(path)) if saved else load_dataset(str(path))
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    if "train" not in data:
        raise DataError(f"the data set at {cfg.path!r} has no 'train' split (it has {list(data)})")
    label = data["train"].features.get(cfg.label_column)
    pool = _hf_split(data["train"], cfg)
    classes = len(label.names) if hasattr(label, "names") else int(pool[1].max()) + 1
    return finish_scenario(cfg, classes, pool, _hf_split(data["test"], cfg) if "test" in data else None)

