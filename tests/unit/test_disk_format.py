"""The checkpoint file format: round trip, damage detection, atomic replacement (no MLX)."""

import numpy as np
import pytest

from worker.disk_format import TEMP_PREFIX, CorruptEntry, read_entry, write_entry


def sample_arrays():
    return {
        "L0.kv.k": (np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4), "float32"),
        "P3.L1.0": (np.arange(6, dtype=np.uint16).reshape(2, 3), "bfloat16"),
    }


def test_round_trip_keeps_header_values_and_dtypes(tmp_path):
    path = tmp_path / "a.ckpt"
    size, checksum = write_entry(path, {"tokens": 3, "meta": {"x": [1, None]}}, sample_arrays())
    assert size == path.stat().st_size and len(checksum) == 64
    header, arrays = read_entry(path)
    assert header == {"tokens": 3, "meta": {"x": [1, None]}}
    for name, (data, dtype) in sample_arrays().items():
        got, got_dtype = arrays[name]
        assert got_dtype == dtype and got.dtype == data.dtype and np.array_equal(got, data)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_file_is_refused(tmp_path, damage):
    path = tmp_path / "a.ckpt"
    write_entry(path, {"tokens": 3}, sample_arrays())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a checkpoint at all, but long enough to have a trailer of 32 bytes")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptEntry):
        read_entry(path)


def test_a_write_replaces_the_old_file_whole_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "a.ckpt"
    write_entry(path, {"version": 1}, sample_arrays())
    write_entry(path, {"version": 2}, sample_arrays())
    assert read_entry(path)[0] == {"version": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.ckpt"
    write_entry(path, {"version": 1}, sample_arrays())

    class Boom:
        def __array__(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_entry(path, {"version": 2}, {"x": (Boom(), "float32")})
    assert read_entry(path)[0] == {"version": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
