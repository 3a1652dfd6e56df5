"""The GPU collectives engine: NCCL through cupy.cuda.nccl, on the device worker's stream.

NCCL calls are asynchronous, so a dead peer shows up as a stream that never finishes: callers wait
with `wait(timeout)`, which aborts the communicator when the deadline passes.
"""
from __future__ import annotations

import os
import threading
import time

import structlog

from .collectives import UNIQUE_ID_BYTES, CollectiveError, Communicator

log = structlog.get_logger(__name__)
ABORT_GRACE_SECONDS = 10.0


def create_group_id() -> bytes:
    from cupy.cuda import nccl
    return bytes(b & 0xFF for b in nccl.get_unique_id())


def _nccl_dtype(nccl, dtype) -> int:
    codes = {"float32": nccl.NCCL_FLOAT32, "float16": nccl.NCCL_FLOAT16,
             "bfloat16": getattr(nccl, "NCCL_BFLOAT16", 9)}  # ncclBfloat16 = 9 in nccl.h
    return codes[str(dtype)]


class NcclCommunicator(Communicator):
    def __init__(self, uid: bytes, rank: int, size: int, stream, step_timeout: float):
        from cupy.cuda import nccl
        if len(uid) != UNIQUE_ID_BYTES:
            raise CollectiveError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
        self._nccl, self.rank, self.size, self.stream, self.step_timeout = nccl, rank, size, stream, step_timeout
        try:
            self.comm = nccl.NcclCommunicator(size, uid, rank)  # CuPy 14 takes the id as bytes
        except TypeError:  # older CuPy: a tuple of C chars
            self.comm = nccl.NcclCommunicator(size, tuple(b - 256 if b > 127 else b for b in uid), rank)
        self._aborted = False

    def _check(self):
        if self._aborted:
            raise CollectiveError(f"the NCCL communicator of rank {self.rank} was aborted")

    def all_reduce(self, x):
        self._check()
        x = x if x.flags.c_contiguous else x.copy()
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, _nccl_dtype(self._nccl, x.dtype), self._nccl.NCCL_SUM,
                            self.stream.ptr)
        return x

    def broadcast(self, x, root: int = 0):
        self._check()
        self.comm.bcast(x.data.ptr, x.size, _nccl_dtype(self._nccl, x.dtype), root, self.stream.ptr)
        return x

    def all_gather(self, x):
        import cupy
        self._check()
        out = cupy.empty((self.size, *x.shape), dtype=x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, _nccl_dtype(self._nccl, x.dtype), self.stream.ptr)
        return out

    def barrier(self) -> None:
        import cupy
        self.all_reduce(cupy.zeros(1, dtype=cupy.float32))
        self.wait(self.step_timeout)

    def wait(self, timeout: float) -> None:
        """Block until the stream's work is done; past the deadline, abort and raise."""
        deadline = time.monotonic() + timeout
        while not self.stream.done:
            if time.monotonic() > deadline:
                self.abort()
                raise CollectiveError(f"a step on rank {self.rank} passed its {timeout:g} s deadline; "
                                      "the NCCL communicator was aborted")
            time.sleep(0.0002)

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        # ncclCommAbort can itself hang on a wedged device: then the process must go, so that its
        # supervisor restarts it with a clean device.
        done = threading.Event()
        watchdog = threading.Timer(ABORT_GRACE_SECONDS, lambda: done.is_set() or _exit_hung())
        watchdog.daemon = True
        watchdog.start()
        try:
            self.comm.abort()
        finally:
            done.set()
            watchdog.cancel()


def _exit_hung() -> None:
    log.critical("NCCL abort hung; exiting so the supervisor restarts this neuron")
    os._exit(70)
