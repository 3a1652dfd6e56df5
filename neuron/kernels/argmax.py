"""Greedy picks of a turn's rows (argmax.cu): the CuPy launcher and the NumPy mirror."""
from __future__ import annotations

import functools

import numpy as np

from common.dtypes import KERNEL_CODES

THREADS, PER_THREAD = 256, 16   # argmax_chunks' block, and the ids each of its threads loads together
CHUNK = THREADS * PER_THREAD    # ids a block takes (ARGMAX_CHUNK)


@functools.lru_cache(maxsize=None)
def _kernels(device: int):
    from neuron.kernels import load_module
    module = load_module("argmax.cu", KERNEL_CODES["float32"], f"-DARGMAX_THREADS={THREADS}",
                         f"-DARGMAX_PER_THREAD={PER_THREAD}")
    return module.get_function("argmax_chunks"), module.get_function("argmax_pick")


def argmax_rows_cuda(logits, rows, out=None):
    """int64 [len(rows)] on the device: the first maximum of each listed row of float32 logits [R, V]
    (a NaN above every number, as cupy.argmax); into `out` when given (a graph's fixed buffer)."""
    import cupy

    if logits.dtype != np.float32 or not logits.flags.c_contiguous:
        logits = cupy.ascontiguousarray(logits, dtype=cupy.float32)
    if out is None:
        out = cupy.empty(len(rows), dtype=cupy.int64)
    if len(rows):
        vocab = logits.shape[1]
        chunks = max(1, -(-vocab // CHUNK))
        best_value = cupy.empty((len(rows), chunks), dtype=cupy.float32)
        best_id = cupy.empty((len(rows), chunks), dtype=cupy.int32)
        by_chunk, pick = _kernels(cupy.cuda.runtime.getDevice())
        by_chunk((len(rows), chunks), (THREADS,), (logits, rows, np.int32(vocab), best_value, best_id))
        pick((len(rows),), (32,), (best_value, best_id, np.int32(chunks), out))
    return out


def argmax_rows_numpy(logits, rows) -> np.ndarray:
    return np.argmax(np.asarray(logits, dtype=np.float32)[np.asarray(rows)], axis=-1).astype(np.int64)
