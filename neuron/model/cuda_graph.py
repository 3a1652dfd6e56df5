"""CUDA-graph capture of the decode step, and the small host<->device transfers around it.

The decode step reads its position, KV slot and input token from a device array `meta`, so a
single graph, captured once per shard (and KV cache), is replayed for every step of every sequence.
Around a replay only two tiny copies cross the bus: `meta` in (from pinned host memory) and the
picked token id out (into a pinned per-slot ring, so the next step can already be queued while
the host waits for this one's token).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import structlog

log = structlog.get_logger(__name__)


class CudaStepIO:
    """Pinned host buffers and async copies for meta [pos, slot, token, 0] and the sampled token."""

    def __init__(self, cp):
        from cupy_backends.cuda.api import runtime

        self.cp, self.runtime = cp, runtime
        self.meta = cp.zeros(4, dtype=np.int32)
        import cupyx
        self.meta_host = cupyx.empty_pinned((4,), dtype=np.int32)
        self.ring = None
        self._copied = cp.cuda.Event(disable_timing=True)
        self._pending = False

    def set_meta(self, pos: int, slot: int, token: int = 0) -> None:
        if self._pending:
            self._copied.synchronize()  # the previous copy must have read meta_host before it changes
        self.meta_host[:] = (pos, slot, token, 0)
        stream = self.cp.cuda.get_current_stream()
        self.runtime.memcpyAsync(self.meta.data.ptr, self.meta_host.ctypes.data, 16,
                                 self.runtime.memcpyHostToDevice, stream.ptr)
        self._copied.record(stream)
        self._pending = True

    def set_token_from_device(self, tokens) -> None:
        """meta[2] = tokens[0] without a host round trip."""
        self.meta[2:3] = tokens[0:1].astype(np.int32, copy=False)

    def copy_token_async(self, tokens_dev, slot: int, parity: int) -> None:
        """Queue the copy of tokens_dev[slot] into the host ring entry (slot, parity)."""
        self._ensure(slot)
        stream = self.cp.cuda.get_current_stream()
        self.runtime.memcpyAsync(self.ring[slot, parity:parity + 1].ctypes.data, tokens_dev.data.ptr + 4 * slot, 4,
                                 self.runtime.memcpyDeviceToHost, stream.ptr)
        self.ring_events[slot][parity].record(stream)

    def wait_token(self, slot: int, parity: int) -> int:
        self.ring_events[slot][parity].synchronize()
        return int(self.ring[slot, parity])

    def token_ready(self, slot: int, parity: int):
        """A poll for the copy of (slot, parity): the NCCL step deadline polls it before wait_token
        blocks, so a hung collective cannot block the worker thread."""
        event = self.ring_events[slot][parity]
        return lambda: event.done

    def mark_step(self) -> None:
        """A follower rank's step is queued: remember its end (two in flight at most)."""
        if not hasattr(self, "_steps"):
            self._steps = [self.cp.cuda.Event(disable_timing=True) for _ in range(2)]
            self._step_no = 0
        self._step_no += 1
        self._steps[self._step_no % 2].record()

    def previous_step_done(self) -> bool:
        """Whether the step before the last marked one has finished: a follower waits (bounded)
        for that one, not the last, so its GPU always has the next step queued."""
        if getattr(self, "_step_no", 0) < 2:
            return True
        return self._steps[(self._step_no - 1) % 2].done

    def _ensure(self, slot: int) -> None:
        if getattr(self, "ring", None) is None or slot >= self.ring.shape[0]:
            import cupyx
            n = max(slot + 1, 8)
            self.ring = cupyx.empty_pinned((n, 2), dtype=np.int32)
            self.ring_events = [[self.cp.cuda.Event(disable_timing=True) for _ in range(2)] for _ in range(n)]


class NumpyStepIO:
    def __init__(self):
        self.meta = np.zeros(4, dtype=np.int32)
        self.ring: dict = {}

    def set_meta(self, pos: int, slot: int, token: int = 0) -> None:
        self.meta[:] = (pos, slot, token, 0)

    def set_token_from_device(self, tokens) -> None:
        self.meta[2] = int(tokens[0])

    def copy_token_async(self, tokens_dev, slot: int, parity: int) -> None:
        self.ring[(slot, parity)] = int(tokens_dev[slot])

    def wait_token(self, slot: int, parity: int) -> int:
        return self.ring.pop((slot, parity))

    def token_ready(self, slot: int, parity: int):
        return lambda: True

    def mark_step(self) -> None:
        pass

    def previous_step_done(self) -> bool:
        return True


class DecodeGraph:
    """Captures `body()` (kernel launches only: no allocation, no host sync) on the current stream
    and replays it. Falls back to running `body()` eagerly when capture is not possible.
    `warmup()` (default: body) runs once eagerly before the capture, to load modules and set kernel
    attributes; a TP rank's warm-up leaves the collectives out, so it needs no other rank. NCCL
    calls inside body() are captured (the communicator must use the current stream)."""

    def __init__(self, cp, body: Callable[[], None], warmup: Callable[[], None] | None = None):
        self.cp, self.body, self.warmup = cp, body, warmup or body
        self.graph = None
        self.failed: str | None = None

    def capture(self) -> bool:
        cp = self.cp
        stream = cp.cuda.get_current_stream()
        if stream.ptr == 0:
            self.failed = "the current stream is the legacy default stream; graphs need a created stream"
            return False
        self.warmup()  # loads modules, sets kernel attributes
        stream.synchronize()
        try:
            stream.begin_capture()
            try:
                self.body()
            except BaseException:
                try:  # end the capture, but report what broke it (ending says only "invalidated")
                    stream.end_capture()
                except Exception:  # noqa: BLE001
                    pass
                raise
            graph = stream.end_capture()
            graph.upload(stream)
            stream.synchronize()
        except Exception as err:  # noqa: BLE001 - replay is an optimisation; eager launches still work
            self.failed = f"{type(err).__name__}: {err}"
            log.warning("decode graph capture failed; launching eagerly", error=self.failed)
            return False
        self.graph = graph
        return True

    def launch(self) -> None:
        if self.graph is not None:
            self.graph.launch(self.cp.cuda.get_current_stream())
        else:
            self.body()
