"""Tensors as they cross the wire: a Flower ``Array``'s bytes read without parsing their header, where they
are exactly what ``np.save`` writes for the tensor expected. Used by the server's checks on every reply and by
each client on the tensors it receives."""

from __future__ import annotations

import io
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


@lru_cache(maxsize=4096)
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes | None:
    """The bytes ``np.save`` writes before the values of a C-ordered ``dtype`` array of ``shape`` (as
    Flower's ``Array`` does when it serialises one): format 1.0's header; ``None`` where it needs 2.0."""
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                   "fortran_order": False, "shape": shape})
    except ValueError:
        return None
    return buf.getvalue()


def array_values(a: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The values ``a``'s bytes hold, read-only, as ``a.numpy()`` reads them; ``shape`` and ``dtype``: what it
    must hold (on the server, what was sent, never the reply's own metadata).

    ``np.load`` parses every array's header with ``ast.literal_eval``: 7 ms a reply on a small CNN, three
    times over on the server (the checks, then the merge), the largest share of a round's server time at 50
    clients a round, and once more on each client. Bytes that are exactly ``np.save``'s for ``shape`` and
    ``dtype`` (its header, then the values) are viewed in place; anything else is read by ``a.numpy()``,
    whose result or error the caller checks as before. Numpy has no reader that skips the parse, hence this one.
    """
    try:
        numeric = np.dtype(dtype).kind in "biufc"
    except TypeError:  # no dtype numpy knows: a.numpy() says what it is
        numeric = False
    if a.stype == "numpy.ndarray" and numeric:
        header = _npy_header(shape, dtype)
        data = a.data
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if header is not None and len(data) == len(header) + size and data.startswith(header):
            return np.frombuffer(data, dtype=dtype, offset=len(header)).reshape(shape)
    return Array.numpy(a)


def torch_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()``, each tensor read by ``array_values`` (at the shape and dtype the record
    declares) into memory of its own."""
    return OrderedDict((k, torch.from_numpy(np.array(array_values(a, tuple(a.shape), a.dtype))))
                       for k, a in record.items())


class CheckedArray(Array):
    """An ``Array`` whose ``numpy()`` reads by ``array_values`` (into writable memory of its own, as ``np.load``
    returns): what a strategy merges once the server's checks have read every tensor (Flower's own merges call
    ``numpy()`` on every tensor of every reply, parsing each header again)."""

    def numpy(self) -> np.ndarray:
        return np.array(array_values(self, tuple(self.shape), self.dtype))


def checked(record: ArrayRecord) -> ArrayRecord:
    """``record`` with the same bytes, each tensor a ``CheckedArray``."""
    return ArrayRecord({k: CheckedArray(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
                        for k, a in record.items()})
