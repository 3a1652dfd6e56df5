"""The dtype table, byte sizes as people read them, and the safetensors header parser against
files written by the safetensors library (and broken ones)."""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from common.dtypes import BY_NAME, BY_SAFETENSORS, DTYPES, KERNEL_CODES, TABLE, nccl_code
from common.errors import InvalidArgument
from common.units import human_bytes
from neuron.loader import read_safetensors_header


def test_dtype_table_is_consistent():
    assert list(DTYPES) == ["float32", "float16", "bfloat16"]
    assert KERNEL_CODES == {"bfloat16": 0, "float16": 1, "float32": 2}  # the kernels' DT macro
    assert len(BY_NAME) == len(BY_SAFETENSORS) == len(TABLE)
    for entry in TABLE:
        assert entry.numpy.name == entry.name
    # nccl.h: ncclInt32 = 2, ncclFloat16 = 6, ncclFloat32 = 7, ncclBfloat16 = 9
    assert [nccl_code(t) for t in (np.int32, np.float16, np.float32, ml_dtypes.bfloat16)] == [2, 6, 7, 9]
    with pytest.raises(TypeError, match="NCCL has no type"):
        nccl_code(np.int16)


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30, -(2 << 20))] == [
        "0 B", "1023 B", "1.00 KiB", "1.50 KiB", "5.00 MiB", "3.00 GiB", "-2.00 MiB"]


def test_header_matches_the_library(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, dtype=ml_dtypes.bfloat16),
               "c": np.zeros((0, 4), dtype=np.int64), "d": np.array([True, False])}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    metas = read_safetensors_header(path)
    assert set(metas) == set(tensors)
    data = path.read_bytes()
    for name, array in tensors.items():
        meta = metas[name]
        assert BY_SAFETENSORS[meta.dtype].numpy == array.dtype and meta.shape == array.shape
        assert data[meta.offset:meta.offset + meta.nbytes] == array.tobytes(), name


def write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("header, data, length, why", [
    (b"", b"", None, "not JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "malformed entry"),
    ({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "malformed entry"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "past the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"F32 \[3\] needs 12"),
    ({}, b"", 1 << 40, "does not fit the file"),
])
def test_broken_headers_are_refused(tmp_path, header, data, length, why):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(InvalidArgument, match=f"not a readable safetensors file.*{why}"):
        read_safetensors_header(path)


def test_too_short_file(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(InvalidArgument, match="shorter than the 8-byte header length"):
        read_safetensors_header(tmp_path / "short.safetensors")
