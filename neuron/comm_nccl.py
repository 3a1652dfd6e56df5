"""The GPU collectives engine: NCCL through cupy.cuda.nccl, on the device worker's stream.

NCCL calls are asynchronous, so a dead peer shows up as a stream that never finishes: callers wait
with `wait(timeout)`, which aborts the communicator when the deadline passes.

The decode step's collectives are captured in the worker's CUDA graph (the communicator runs on the
worker's stream). NCCL (2.26+) does not let a communicator go, abort included, while a CUDA graph
that holds its collectives exists: ncclCommAbort would wait for that graph forever. So whoever
captures registers a release with `before_abort`, and abort() drops those graphs first (a graph still
running is freed by CUDA when it ends, which the abort flag makes happen). NCCL_GRAPH_REGISTER defaults to 0 here: registering the graph's buffers would
exchange IPC handles with the peers during capture, tying one rank's load to the others'; the
decode collectives are a few KiB, where registration gains nothing.
"""
from __future__ import annotations

import os
import threading
import time
import weakref

import structlog

from common.dtypes import nccl_code

from .collectives import UNIQUE_ID_BYTES, CollectiveError, Communicator

log = structlog.get_logger(__name__)
ABORT_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.00005
os.environ.setdefault("NCCL_GRAPH_REGISTER", "0")  # before NCCL reads its settings (see above)


def create_group_id() -> bytes:
    from cupy.cuda import nccl
    return bytes(b & 0xFF for b in nccl.get_unique_id())


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
        self._release: list = []

    def before_abort(self, release) -> None:
        """release() drops the CUDA graphs that captured this communicator; abort() calls it first.
        Held weakly (a bound method of the model would otherwise keep its weights alive)."""
        self._release.append(weakref.WeakMethod(release) if hasattr(release, "__self__") else (lambda: release))

    def _check(self):
        if self._aborted:
            raise CollectiveError(f"the NCCL communicator of rank {self.rank} was aborted")

    def all_reduce(self, x):
        self._check()
        x = x if x.flags.c_contiguous else x.copy()
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, nccl_code(x.dtype), self._nccl.NCCL_SUM,
                            self.stream.ptr)
        return x

    def broadcast(self, x, root: int = 0):
        self._check()
        self.comm.bcast(x.data.ptr, x.size, nccl_code(x.dtype), root, self.stream.ptr)
        return x

    def all_gather(self, x):
        import cupy
        self._check()
        out = cupy.empty((self.size, *x.shape), dtype=x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, nccl_code(x.dtype), self.stream.ptr)
        return out

    def all_gather_into(self, out):
        self._check()
        n = out.size // self.size
        item = out.dtype.itemsize
        self.comm.allGather(out.data.ptr + self.rank * n * item, out.data.ptr, n, nccl_code(out.dtype),
                            self.stream.ptr)  # in place: sendbuff == recvbuff + rank * count

    def barrier(self) -> None:
        import cupy
        self.all_reduce(cupy.zeros(1, dtype=cupy.float32))
        self.wait(self.step_timeout)

    def wait(self, timeout: float, ready=None) -> None:
        """Block until `ready()` (default: the stream's work is done); past the deadline, abort
        the communicator and raise. A caller that keeps later steps queued passes a poll of the
        step it needs (an event), so the wait does not cover the queued ones."""
        done = ready or (lambda: self.stream.done)
        if done():
            return
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                self.abort()
                raise CollectiveError(f"a step on rank {self.rank} passed its {timeout:g} s deadline; "
                                      "the NCCL communicator was aborted")
            time.sleep(POLL_SECONDS)

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
            for ref in self._release:
                release = ref()
                if release is not None:
                    try:
                        release()
                    except Exception:  # noqa: BLE001 - the abort must go on
                        log.exception("releasing the CUDA graphs of a communicator failed")
            self._release.clear()
            self.comm.abort()
        finally:
            done.set()
            watchdog.cancel()


def _exit_hung() -> None:
    log.critical("NCCL abort hung; exiting so the supervisor restarts this neuron")
    os._exit(70)
