"""Checkpoint bytes to device memory with one host copy: tensor data is read from the safetensors
file (several threads, `preadv`) straight into pinned staging buffers, and copied to the device
asynchronously while the next chunk is read. Row slices (the only reads a rank makes for column-
parallel weights, and whole tensors) are contiguous byte ranges, so q/k/v and gate/up land
side by side in their fused parameter with no concatenate.

Used for CUDA shards whose checkpoint dtype is the shard's dtype; anything else (dtype conversion,
column slices of row-parallel weights) takes the safetensors path in shard.py.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from common.dtypes import BY_SAFETENSORS
from common.errors import InvalidArgument
CHUNK_BYTES = 64 << 20
BUFFERS = 3
READ_THREADS = 8
MIN_PIECE = 4 << 20


class DeviceUploader:
    def __init__(self, cp, checkpoint):
        import cupyx
        from cupy_backends.cuda.api import runtime

        self.cp, self.runtime, self.ckpt = cp, runtime, checkpoint
        self._fds: dict[Path, int] = {}
        self._bufs = [cupyx.empty_pinned((CHUNK_BYTES,), dtype=np.uint8) for _ in range(BUFFERS)]
        self._events = [cp.cuda.Event(disable_timing=True) for _ in range(BUFFERS)]
        self._used = [False] * BUFFERS
        self._next = 0
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="upload")
        self.stats = {"bytes": 0, "read_s": 0.0, "wait_s": 0.0}  # where a load's time goes

    def can_load(self, reads, dtype) -> bool:
        for r in reads:
            meta = self.ckpt.tensors[r.name]
            if not _full_width(r, meta.shape) or BY_SAFETENSORS[meta.dtype].name != np.dtype(dtype).name:
                return False
        return True

    def _range(self, read) -> tuple[int, int, int, tuple[int, ...]]:
        """(fd, absolute offset, bytes, shape) of a row slice."""
        meta = self.ckpt.tensors[read.name]
        if meta.file not in self._fds:
            self._fds[meta.file] = os.open(meta.file, os.O_RDONLY)
        shape = tuple(meta.shape)
        row_bytes = meta.nbytes // shape[0] if shape and shape[0] else meta.nbytes
        offset, nbytes = meta.offset, meta.nbytes
        if read.rows is not None:
            r0, r1, _ = read.rows.indices(shape[0])
            offset, nbytes = offset + r0 * row_bytes, (r1 - r0) * row_bytes
            shape = (r1 - r0,) + shape[1:]
        return self._fds[meta.file], offset, nbytes, shape

    def load(self, reads, dtype):
        """A device array: the reads concatenated along dim 0. Returns before the copies finish."""
        ranges = [self._range(r) for r in reads]
        shapes = [s for *_, s in ranges]
        shape = shapes[0] if len(shapes) == 1 else (sum(s[0] for s in shapes),) + shapes[0][1:]
        out = self.cp.empty(shape, dtype=dtype)
        dst = out.data.ptr
        for fd, offset, nbytes, _ in ranges:
            self._copy(fd, offset, nbytes, dst)
            dst += nbytes
        return out, sum(n for _, _, n, _ in ranges)

    def _copy(self, fd: int, offset: int, nbytes: int, dst: int) -> None:
        stream = self.cp.cuda.get_current_stream()
        done = 0
        while done < nbytes:
            n = min(CHUNK_BYTES, nbytes - done)
            b = self._next % BUFFERS
            self._next += 1
            t0 = time.perf_counter()
            if self._used[b]:
                self._events[b].synchronize()  # its previous copy has left the buffer
            t1 = time.perf_counter()
            buf = self._bufs[b]
            self._read(fd, buf, n, offset + done)
            self.stats["wait_s"] += t1 - t0
            self.stats["read_s"] += time.perf_counter() - t1
            self.stats["bytes"] += n
            self.runtime.memcpyAsync(dst + done, buf.ctypes.data, n, self.runtime.memcpyHostToDevice, stream.ptr)
            self._events[b].record(stream)
            self._used[b] = True
            done += n

    def _read(self, fd: int, buf: np.ndarray, n: int, offset: int) -> None:
        pieces = max(1, min(READ_THREADS, n // MIN_PIECE))
        step = -(-n // pieces)
        view = memoryview(buf)
        jobs = [self._pool.submit(_pread_full, fd, view[a:min(a + step, n)], offset + a) for a in range(0, n, step)]
        for job in jobs:
            job.result()

    def close(self) -> None:
        for event, used in zip(self._events, self._used):
            if used:
                event.synchronize()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bufs.clear()


def _full_width(read, shape) -> bool:
    """A column slice that keeps every column (row-parallel weights at tp size 1) is no slice."""
    return read.cols is None or (len(shape) == 2 and read.cols.indices(shape[1]) == (0, shape[1], 1))


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise InvalidArgument("a safetensors file ended early (truncated checkpoint?)")
        got += n
