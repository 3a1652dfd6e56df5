"""Greedy picks of a turn's rows (argmax.cu): the CuPy launcher and the NumPy mirror."""
from __future__ import annotations

import functools

import numpy as np

from common.dtypes import KERNEL_CODES

THREADS = 1024


@functools.lru_cache(maxsize=None)
def _kernel(device: int):
    from neuron.kernels import load_module
    return load_module("argmax.cu", KERNEL_CODES["float32"]).get_function("argmax_rows")


def argmax_rows_cuda(logits, rows):
    """int64 [len(rows)] on the device: the first maximum of each listed row of float32 logits [R, V]
    (a NaN above every number, as cupy.argmax)."""
    import cupy

    if logits.dtype != np.float32 or not logits.flags.c_contiguous:
        logits = cupy.ascontiguousarray(logits, dtype=cupy.float32)
    out = cupy.empty(len(rows), dtype=cupy.int64)
    if len(rows):
        _kernel(cupy.cuda.runtime.getDevice())((len(rows),), (THREADS,), (logits, rows, np.int32(logits.shape[1]), out))
    return out


def argmax_rows_numpy(logits, rows) -> np.ndarray:
    return np.argmax(np.asarray(logits, dtype=np.float32)[np.asarray(rows)], axis=-1).astype(np.int64)
