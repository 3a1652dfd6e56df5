"""The one table of element types: how NumPy, safetensors headers, NCCL and our CUDA kernels name
each one. Every other module looks dtypes up here, so adding one is a single row.

Names are NumPy's ("bfloat16"), which are also what config.json's torch_dtype and the APIs use.
bfloat16 and the float8 types are NumPy dtypes through ml_dtypes, which importing this module
registers (safetensors needs that to return bfloat16 arrays).
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str                  # NumPy's name: "bfloat16"
    safetensors: str           # the tag in a safetensors header: "BF16"
    numpy: np.dtype
    nccl: int | None = None    # ncclDataType_t from nccl.h (cupy.cuda.nccl.NCCL_*); None: not communicated
    kernel: int | None = None  # the CUDA kernels' DT code (the -DDT= macro); None: no kernels for it

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize


TABLE: tuple[DType, ...] = (
    # The serving dtypes first, in the order error messages list them.
    DType("float32", "F32", np.dtype(np.float32), nccl=7, kernel=2),
    DType("float16", "F16", np.dtype(np.float16), nccl=6, kernel=1),
    DType("bfloat16", "BF16", np.dtype(ml_dtypes.bfloat16), nccl=9, kernel=0),
    DType("float64", "F64", np.dtype(np.float64), nccl=8),
    DType("float8_e4m3fn", "F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn)),
    DType("float8_e5m2", "F8_E5M2", np.dtype(ml_dtypes.float8_e5m2)),
    DType("int64", "I64", np.dtype(np.int64), nccl=4),
    DType("int32", "I32", np.dtype(np.int32), nccl=2),
    DType("int16", "I16", np.dtype(np.int16)),
    DType("int8", "I8", np.dtype(np.int8), nccl=0),
    DType("uint64", "U64", np.dtype(np.uint64), nccl=5),
    DType("uint32", "U32", np.dtype(np.uint32), nccl=3),
    DType("uint16", "U16", np.dtype(np.uint16)),
    DType("uint8", "U8", np.dtype(np.uint8), nccl=1),
    DType("bool", "BOOL", np.dtype(np.bool_)),
)
BY_NAME: dict[str, DType] = {d.name: d for d in TABLE}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in TABLE}

# What a shard can be served in (the dtypes the kernels are built for), name -> NumPy dtype.
DTYPES: dict[str, np.dtype] = {d.name: d.numpy for d in TABLE if d.kernel is not None}
KERNEL_CODES: dict[str, int] = {d.name: d.kernel for d in TABLE if d.kernel is not None}
SAFETENSORS_ITEMSIZE: dict[str, int] = {d.safetensors: d.itemsize for d in TABLE}


def nccl_code(dtype) -> int:
    """NCCL's type code for a NumPy/CuPy dtype (or its name)."""
    entry = BY_NAME.get(np.dtype(dtype).name)
    if entry is None or entry.nccl is None:
        raise TypeError(f"NCCL has no type for {dtype}")
    return entry.nccl
