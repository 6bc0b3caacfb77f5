"""``fedtl.wire``: a tensor read without numpy's header parse, exactly as ``Array.numpy`` reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array

from fedtl.wire import array_values


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int8", "uint8", "bool", "complex64"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3, 4), (1, 70000)])
def test_a_tensor_reads_as_array_numpy_reads_it(dtype: str, shape: tuple[int, ...]) -> None:
    values = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    a = Array(values)
    got = array_values(a, shape, dtype)
    np.testing.assert_array_equal(got, a.numpy())
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    assert not got.flags.writeable  # viewed in place, not parsed by np.load (whose arrays are writeable)


def npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(("data", "held"), [
    (npy(np.ones((3, 2), np.float32)), ((3, 2), "float32")),  # another shape: read by np.load, as it holds
    (npy(np.ones((2, 3), np.float64)), ((2, 3), "float64")),  # another dtype
    (npy(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))), ((2, 3), "float32")),  # column order
    (npy(np.ones(1, np.float32)), ((1,), "float32")),  # one value, declared as a 2 x 3 matrix
])
def test_bytes_that_are_not_the_declared_tensor_are_read_for_what_they_hold(data: bytes, held: tuple) -> None:
    a = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)
    got = array_values(a, (2, 3), "float32")  # what was sent: 2 x 3 float32
    assert (got.shape, str(got.dtype)) == held  # the caller sees what the bytes hold, and refuses the reply
    np.testing.assert_array_equal(got, np.load(io.BytesIO(data)))


def test_bytes_that_are_no_array_raise_as_array_numpy_does() -> None:
    good = npy(np.ones((2, 3), np.float32))
    for data in (good[:-4], b"not an array"):  # cut short, or no array at all
        with pytest.raises(ValueError):
            array_values(Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data), (2, 3), "float32")


def test_a_record_reads_as_flowers_torch_state_dict() -> None:
    import torch
    from flwr.app import ArrayRecord

    from fedtl.wire import torch_state

    record = ArrayRecord({"w": torch.randn(3, 4), "n": torch.tensor(7), "b": torch.zeros(0, dtype=torch.float16)})
    ours, flowers = torch_state(record), record.to_torch_state_dict()
    assert list(ours) == list(flowers)
    for k in flowers:
        torch.testing.assert_close(ours[k], flowers[k], rtol=0, atol=0)
        ours[k].add_(1)  # writable memory of its own: the record's bytes are untouched
    torch.testing.assert_close(record.to_torch_state_dict()["w"], flowers["w"], rtol=0, atol=0)


def test_a_checked_record_holds_the_same_bytes_and_reads_them_as_flower_does() -> None:
    from flwr.app import ArrayRecord

    from fedtl.wire import checked

    column_order = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))  # read by np.load
    record = ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
                          "f": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=npy(column_order))})
    ours = checked(record)
    assert list(ours) == list(record) and all(ours[k].data == record[k].data for k in record)
    for k in record:
        values = ours[k].numpy()
        np.testing.assert_array_equal(values, record[k].numpy())
        values += 1  # writable, as np.load's arrays are
