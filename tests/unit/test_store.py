"""The data store: its rows are the decoded images; a partial or damaged entry is rebuilt; one builder at a time."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from fedtl.config import DataConfig
from fedtl.data.scenarios import load_scenario
from fedtl.data.store import Writer, open_arrays, store_key

PARTS = {"kind": "test", "what": "counting"}


def _builder(log: Path, delay: float = 0.0):  # noqa: ANN202 - a builder for open_arrays
    def build(w: Writer) -> dict[str, object]:
        with log.open("a") as f:
            f.write("built\n")
        time.sleep(delay)
        x = w.array("x", (50, 3, 4, 4), "uint8")
        for i in range(50):  # row by row, as a decoder writes
            x[i] = i
        w.put("y", np.arange(50))
        return {"classes": 50}
    return build


def _builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_rows_are_the_decoded_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    pixels = {}
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / cls / f"{i}.png")
            pixels[f"{cls}/{i}"] = arr
    cfg = DataConfig(scenario="image-folder", path=str(folder), image_size=12, test_fraction=0.34,
                     store_dir=str(tmp_path / "store"))
    sc = load_scenario(cfg)
    assert sc.pool_x.dtype == torch.uint8 and sc.key
    # Each stored row is the file decoded and resized to 12 px (antialiased), in uint8, at full precision.
    expected = {tuple(TF.resize(torch.from_numpy(a).permute(2, 0, 1), [12, 12], antialias=True).flatten().tolist())
                for a in pixels.values()}
    stored = {tuple(r.flatten().tolist()) for r in torch.cat([sc.pool_x, sc.test_x])}
    assert stored == expected
    again = load_scenario(cfg)  # mapped from the same files, not decoded again
    assert torch.equal(again.pool_x, sc.pool_x) and again.key == sc.key
    (folder / "a" / "3.png").write_bytes((folder / "a" / "0.png").read_bytes())  # a new file: a new entry
    assert load_scenario(cfg).key != sc.key


def test_an_entry_is_built_once_and_then_mapped(tmp_path: Path) -> None:
    log = tmp_path / "log"
    first = open_arrays(tmp_path / "s", PARTS, _builder(log))
    second = open_arrays(tmp_path / "s", PARTS, _builder(log))
    assert _builds(log) == 1 and first.info == {"classes": 50}
    assert torch.equal(second.arrays["x"][7], torch.full((3, 4, 4), 7, dtype=torch.uint8))
    second.arrays["x"][0] += 1  # copy-on-write: the file is never changed through a mapping
    assert open_arrays(tmp_path / "s", PARTS, _builder(log)).arrays["x"][0].max() == 0


def test_a_partial_or_damaged_entry_is_detected_and_rebuilt(tmp_path: Path) -> None:
    log, root = tmp_path / "log", tmp_path / "s"
    open_arrays(root, PARTS, _builder(log))
    entry = root / store_key(PARTS)
    data = entry / "x.npy"

    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # one damaged byte: the size is right, the hash is not
    data.write_bytes(bytes(raw))
    assert _builds(log) == 1 and open_arrays(root, PARTS, _builder(log)).arrays["x"][49, 2, 3, 3] != 49
    fixed = open_arrays(root, PARTS, _builder(log), verify=True)  # what a run's preparation does
    assert _builds(log) == 2 and fixed.arrays["x"][49].eq(49).all()

    with data.open("r+b") as f:  # a build cut short: a truncated file
        f.truncate(100)
    assert open_arrays(root, PARTS, _builder(log)).arrays["x"][49].eq(49).all() and _builds(log) == 3

    (entry / "meta.json").unlink()  # meta.json is written last: without it the entry is incomplete
    open_arrays(root, PARTS, _builder(log))
    assert _builds(log) == 4 and json.loads((entry / "meta.json").read_text())["info"] == {"classes": 50}
    assert not list(root.glob(".*.building-*"))  # no half-built folder is left behind


def _open_in_process(root: str, log: str, out: str) -> None:
    stored = open_arrays(root, PARTS, _builder(Path(log), delay=1.0))
    Path(out).write_text(str(int(stored.arrays["x"].long().sum())))


def test_two_concurrent_builders_build_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_open_in_process, args=(str(tmp_path / "s"), str(log), str(tmp_path / f"out{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert _builds(log) == 1  # the second waited on the lock, then mapped the first one's entry
    total = str(sum(i * 48 for i in range(50)))
    assert [(tmp_path / f"out{i}").read_text() for i in range(2)] == [total, total]



BUILDING_LIBRARIES = {"sklearn", "flwr_datasets", "datasets", "pandas", "matplotlib"}


def test_a_client_maps_its_split_without_the_libraries_that_built_it(tmp_path: Path) -> None:
    # The process that prepares a run builds the scenario and its split into the store once; a client
    # process (each Ray actor) then maps both, and never imports scikit-learn or flwr-datasets
    # (~330 MB per process).
    from fedtl.data.federated import _split, check_partitions

    cfg = DataConfig(store_dir=str(tmp_path), partitioner="dirichlet", alpha=0.5)
    check_partitions(cfg, 5, 3)
    code = (
        "import json, sys\n"
        "from fedtl.config import DataConfig\n"
        "from fedtl.data.federated import client_data, client_test_data\n"
        f"cfg = DataConfig(store_dir={str(tmp_path)!r}, partitioner='dirichlet', alpha=0.5)\n"
        "d, t = client_data(cfg, 2, 5, 3), client_test_data(cfg, 2, 5, 3)\n"
        f"print(json.dumps([d.row_ids().tolist(), t.row_ids().tolist(), sorted({BUILDING_LIBRARIES!r} & set(sys.modules))]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    train, test, imported = json.loads(done.stdout.splitlines()[-1])
    expected = _split(cfg, 5, 3)[2]
    assert train == expected[0].tolist() and test == expected[1].tolist() and len(train) > 0
    assert imported == []
