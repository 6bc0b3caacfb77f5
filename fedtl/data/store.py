"""The data store: arrays decoded once per machine, memory-mapped by every process.

A store entry is a folder of ``.npy`` files (numpy's own format: any tool reads them) and a
``meta.json`` written last, named by a key that hashes what the arrays came from (the source,
its files' names, sizes and times, the image size and channels, the preprocessing version).
Every process on the machine opens the same files with ``np.load(mmap_mode="c")``: the
operating system shares their pages between processes, and a process reads from disk only
the rows it indexes (a client, its partition's; a batch, its rows).

Building is guarded by a file lock (``filelock``: Ray starts a machine's workers together),
happens in a temporary folder renamed into place when complete, and records each file's size
and SHA-256. An entry without ``meta.json`` or with a file of the wrong size is partial and
rebuilt; ``open_arrays(..., verify=True)`` also compares the hashes (the process that prepares
a run does, once) and rebuilds a corrupt entry.

Written here because no library does this job: ``datasets`` caches Arrow tables of decoded
rows, not uint8 image arrays at a chosen size that numpy can map and torch can index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

log = logging.getLogger(__name__)

# Bump when the decoding changes (resizing, channels, dtype): every entry is then rebuilt.
STORE_VERSION = 1
META = "meta.json"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Stored:
    """An opened store entry: its arrays as tensors over the mapped files, and what its builder noted.

    Attributes
    ----------
    key : str
        The entry's key (its folder's name).
    arrays : dict of str to torch.Tensor
        Tensors sharing memory with the mapped files (copy-on-write: writing one never changes the file).
    info : dict
        JSON facts the builder returned (classes, channels, ...).
    """

    key: str
    arrays: dict[str, torch.Tensor]
    info: dict[str, Any]


class Writer:
    """What a builder writes into: arrays it allocates and fills, row by row if it likes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """A new ``.npy`` file ``name`` of ``shape`` and ``dtype``, mapped for writing."""
        arr = np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=np.dtype(dtype), shape=shape)
        self._arrays[name] = arr
        return arr

    def put(self, name: str, values: np.ndarray | torch.Tensor) -> None:
        """Write a whole array at once (small arrays: labels, groups)."""
        a = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        self.array(name, a.shape, a.dtype)[...] = a

    def close(self) -> list[str]:
        for arr in self._arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        names = list(self._arrays)
        self._arrays.clear()
        return names


Builder = Callable[[Writer], Mapping[str, Any]]
"""Fills a ``Writer``; returns the entry's JSON facts."""


def store_key(parts: Mapping[str, Any]) -> str:
    """The key of an entry made from ``parts`` (JSON-able), with the store's version."""
    body = json.dumps({"store-version": STORE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:24]


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """A hash of the names, sizes and modification times of every file under ``paths`` (files or folders):
    changes when a file is added, removed, replaced or edited, without reading the files."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        h.update(f"{root.resolve()}|{len(files)}|".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(root) if f != root else f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
    return h.hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "files" in meta else None


def _problem(folder: Path, verify: bool) -> str | None:
    """Why the entry at ``folder`` cannot be used (``None``: it can)."""
    meta = _read_meta(folder)
    if meta is None:
        return "no complete meta.json (a build was interrupted)" if folder.exists() else "not built"
    for name, facts in meta["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != facts["bytes"]:
            return f"{name} is missing or has the wrong size"
        if verify and _sha256(path) != facts["sha256"]:
            return f"{name} does not match its SHA-256 (the file was changed or damaged)"
    return None


def _open(folder: Path, key: str) -> Stored:
    meta = _read_meta(folder)
    assert meta is not None
    arrays = {}
    for name in meta["files"]:
        arr = np.load(folder / name, mmap_mode="c", allow_pickle=False)
        arrays[Path(name).stem] = torch.from_numpy(arr)
    return Stored(key, arrays, meta.get("info", {}))


def _build(root: Path, key: str, parts: Mapping[str, Any], build: Builder) -> None:
    tmp = root / f".{key}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        writer = Writer(tmp)
        info = dict(build(writer))
        names = writer.close()
        files = {f"{n}.npy": {"bytes": (tmp / f"{n}.npy").stat().st_size, "sha256": _sha256(tmp / f"{n}.npy")}
                 for n in names}
        meta = {"key": key, "parts": parts, "files": files, "info": info,
                "built-seconds": round(time.perf_counter() - started, 3)}
        (tmp / META).write_text(json.dumps(meta, indent=1, default=str))
        final = root / key
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: the entry appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def store_exists(root: str | Path, parts: Mapping[str, Any]) -> bool:
    """Whether a complete entry for ``parts`` is under ``root`` (sizes checked, not hashes)."""
    return _problem(Path(root) / store_key(parts), verify=False) is None


def open_arrays(root: str | Path, parts: Mapping[str, Any], build: Builder, *, verify: bool = False) -> Stored:
    """The store entry for ``parts`` under ``root``, built by ``build`` unless it already exists.

    Parameters
    ----------
    root : str or Path
        The store's folder (``data.store-dir``); created if missing.
    parts : Mapping
        What the arrays come from (JSON-able); hashed into the entry's key.
    build : Builder
        Writes the arrays (called at most once per machine, under the entry's lock).
    verify : bool, default False
        Also check every file's SHA-256 (reads the whole entry once); sizes are always checked.

    Returns
    -------
    Stored
        The entry, its arrays mapped.
    """
    root = Path(root)
    key = store_key(parts)
    folder = root / key
    if _problem(folder, verify) is None:
        return _open(folder, key)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        why = _problem(folder, verify)  # another process may have built it while this one waited
        if why is not None:
            if why != "not built":
                log.warning("data store entry %s: %s; rebuilding it", folder, why)
            _build(root, key, parts, build)
    return _open(folder, key)
