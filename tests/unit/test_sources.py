"""Real data sources on files the tests write in the real on-disk formats, read by the real readers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets as tvd

from fedtl.config import ConfigError, DataConfig
from fedtl.data.federated import client_data, server_test_data, source_data
from fedtl.data.scenarios import load_scenario
from fedtl.errors import DataError
from tests.helpers import write_cifar10


def cifar10_md5s(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """torchvision's CIFAR10 checks each file's MD5 against its class attributes: point them at ours."""
    folder = root / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5("batches.meta")})


def write_mnist(root: Path, train: int = 40, test: int = 20) -> Path:
    """MNIST's IDX files in MNIST/raw, as torchvision reads them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.repeat(labels[:, None, None] * 25, 28 * 28, axis=1).reshape(n, 28, 28).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (20 + 3 * i, 14 + 2 * i)  # any size: resized for the backbone
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., 0] = 80 * c
            img = Image.fromarray(pixels)
            (img.convert("L") if i % 2 else img).save(root / name / f"{i}.png")  # grey and RGB mixed
    return root


def test_cifar10_in_its_own_format_through_torchvisions_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_cifar10(tmp_path / "data")
    with pytest.raises(DataError, match="CIFAR10 is not in data.root.*data.download = true"):
        load_scenario(DataConfig(scenario="torchvision", dataset="CIFAR10", root=str(root), image_size=16))
    cifar10_md5s(monkeypatch, root)  # now the real integrity check passes on our files
    sc = load_scenario(DataConfig(scenario="torchvision", dataset="CIFAR10", root=str(root), image_size=16))
    assert (sc.num_classes, sc.in_channels, sc.styles) == (10, 3, ("clean",))
    assert sc.pool_x.shape == (100, 3, 16, 16) and sc.test_x.shape == (30, 3, 16, 16)
    # The red channel encodes the label: decoding kept images and labels together.
    assert sc.pool_x.dtype == torch.uint8  # decoded once into 8 bits
    assert torch.allclose(sc.pool_x[:, 0].float().mean(dim=(1, 2)), sc.pool_y.float() * 25, atol=0.3)
    with pytest.raises(ConfigError, match="no source data for fedtl to pre-train.*model.weights"):
        source_data(DataConfig(scenario="torchvision", dataset="CIFAR10", root=str(root), image_size=16))


def test_re_packed_files_load_when_checksums_are_not_verified(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "data")
    cfg = DataConfig(scenario="torchvision", dataset="CIFAR10", root=str(root), image_size=8, verify_checksums=False)
    assert load_scenario(cfg).pool_x.shape == (100, 3, 8, 8)


def test_mnist_idx_files_are_grey(tmp_path: Path) -> None:
    root = write_mnist(tmp_path)
    sc = load_scenario(DataConfig(scenario="torchvision", dataset="MNIST", root=str(root), image_size=16))
    assert sc.in_channels == 1 and sc.pool_x.shape == (40, 1, 16, 16) and len(sc.test_y) == 20


def test_image_folder_of_pngs_any_size_grey_and_rgb(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    cfg = DataConfig(scenario="image-folder", path=str(root), image_size=12, test_fraction=0.3, domain_skew=True)
    sc = load_scenario(cfg)
    assert sc.num_classes == 3 and sc.in_channels == 3  # mixed grey and RGB: RGB
    assert len(sc.pool_y) + len(sc.test_y) == 18  # the broken file skipped
    assert sorted(np.bincount(sc.test_y.numpy()).tolist()) == [2, 2, 2]  # a stratified test split
    assert sc.styles[:2] == ("rotate", "blur")  # domain skew on any image data
    client = client_data(DataConfig(scenario="image-folder", path=str(root), image_size=12, test_fraction=0.3,
                                    domain_skew=True, labelled_per_client=0), 1, 2, 0)
    assert client.style[0] == "blur" and client.x.shape[1:] == (3, 12, 12)
    assert len(server_test_data(cfg)) == 6
    with pytest.raises(DataError, match="broken.png is not a readable image.*bad-images"):
        load_scenario(DataConfig(scenario="image-folder", path=str(root), bad_images="error"))


def test_image_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_scenario(DataConfig(scenario="image-folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        load_scenario(DataConfig(scenario="image-folder", path=str(tmp_path / "empty")))
    split = tmp_path / "split"
    write_image_folder(split / "train", classes=("a", "b"))
    write_image_folder(split / "test", classes=("a", "c"))
    with pytest.raises(DataError, match=r"classes \['c'\] outside the run's classes \['a', 'b'\]"):
        load_scenario(DataConfig(scenario="image-folder", path=str(split)))
    with pytest.raises(DataError, match="needs data.dataset"):
        load_scenario(DataConfig(scenario="torchvision"))


def test_saved_hugging_face_dataset(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    features = Features({"img": HFImage(), "label": ClassLabel(names=["no", "yes"])})

    def split(n: int) -> Dataset:
        images = [Image.fromarray(np.full((9, 9), 200 * (i % 2), dtype=np.uint8)) for i in range(n)]
        return Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features)

    DatasetDict({"train": split(10), "test": split(4)}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(scenario="hf-dataset", path=str(tmp_path / "hf"), image_column="img", image_size=8)
    sc = load_scenario(cfg)
    assert (sc.num_classes, sc.in_channels, len(sc.pool_y), len(sc.test_y)) == (2, 1, 10, 4)
    assert torch.allclose(sc.pool_x[sc.pool_y == 1].float().mean(), torch.tensor(200.0), atol=0.3)
    with pytest.raises(DataError, match=r"no column\(s\) \['image'\].*'img'"):
        load_scenario(DataConfig(scenario="hf-dataset", path=str(tmp_path / "hf")))


def test_one_folder_per_client_is_that_clients_data(tmp_path: Path) -> None:
    from fedtl.data.partition import PartitionError

    root = tmp_path / "silos"
    write_image_folder(root / "hospital-a", classes=("cat", "dog"), per_class=5)
    write_image_folder(root / "hospital-b", classes=("dog", "fox"), per_class=4)  # a class the first lacks
    write_image_folder(root / "hospital-c", classes=("cat", "fox"), per_class=3)
    write_image_folder(root / "test", classes=("cat", "dog", "fox"), per_class=2)
    cfg = DataConfig(scenario="client-folders", path=str(root), partitioner="natural", image_size=10,
                     labelled_per_client=0, client_test_fraction=0.0)
    sc = load_scenario(cfg)
    assert sc.num_classes == 3 and len(sc.test_y) == 6 and sc.pool_groups.tolist() == [0] * 10 + [1] * 8 + [2] * 6
    b = client_data(cfg, 1, 3, 0)
    assert len(b) == 8 and sorted(set(b.y.tolist())) == [1, 2]  # hospital-b's own dogs and foxes, nothing else
    assert len(client_data(cfg, 2, 3, 0)) == 6
    with pytest.raises(PartitionError, match="3 client folders but clients = 4"):
        client_data(cfg, 0, 4, 0)
    with pytest.raises(PartitionError, match="set data.partitioner = \"natural\""):
        client_data(DataConfig(scenario="client-folders", path=str(root), image_size=10), 0, 3, 0)
    with pytest.raises(PartitionError, match="natural.*client-folders.* go together"):
        client_data(DataConfig(partitioner="natural"), 0, 3, 0)


def decompression_bomb(path: Path, side: int = 20_000) -> None:
    """A real PNG whose header declares ``side`` x ``side`` pixels (400 M: over twice PIL's limit) in a few bytes."""
    import io
    import zlib

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + width, height, depth, colour type, ...
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_is_skipped_or_refused_as_bad_images_says(tmp_path: Path) -> None:
    # Before: PIL's DecompressionBombError escaped as a traceback even with bad-images = "skip".
    root = write_image_folder(tmp_path / "imgs")
    decompression_bomb(root / "dog" / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(root / "dog" / "bomb.png")  # a real bomb, as PIL judges it
    sc = load_scenario(DataConfig(scenario="image-folder", path=str(root), image_size=12, test_fraction=0.3))
    assert len(sc.pool_y) + len(sc.test_y) == 18  # skipped
    with pytest.raises(DataError, match="bomb.png is not a readable image.*decompression bomb.*bad-images"):
        load_scenario(DataConfig(scenario="image-folder", path=str(root), bad_images="error"))
