"""DeviceWorker: the one thread that touches its device.

It creates the backend (device context, stream, memory pool) on its own thread, runs typed jobs from
a queue and answers through futures, holds the handle slab {TpHandle: Shard}, and interleaves the
decode steps of running sequences with other jobs. Memory figures are cached after every job so
Describe/health never wait behind a long load or generation.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import structlog

from common.errors import NotFound, ResourceExhausted, Unavailable

from .collectives import CollectiveError
from .device import CpuBackend, CudaBackend, DeviceSpec
from .generation import ErrorEvent, Sequence, advance
from .shard import LoadProgress, LoadRequest, Shard, load_shard

log = structlog.get_logger(__name__)

MAX_WAITING = 256  # sequences queued for a KV slot before new ones are refused
_PENDING = object()  # a handler's "no result yet": the job waits for a KV slot


# ---------------------------------------------------------------- jobs

@dataclass
class Job:
    future: Future = field(default_factory=Future, init=False, repr=False)


@dataclass
class LoadShardJob(Job):
    request: LoadRequest
    handle: int
    progress: Callable[[LoadProgress], None]
    cancelled: threading.Event
    comm: Any = None


@dataclass
class DropShardJob(Job):
    handle: int


@dataclass
class ForwardJob(Job):
    handle: int
    token_ids: list[int]
    all_positions: bool


@dataclass
class GenerateJob(Job):
    sequence: Sequence


@dataclass
class ClearKvJob(Job):
    handle: int


@dataclass
class FollowerStepJob(Job):
    """Run one step on a follower rank's shard, as its leader does on rank 0."""
    handle: int
    token_ids: list[int]
    start: int
    slot: int


@dataclass
class CallJob(Job):
    """Run fn(backend) on the device thread (group init, collectives, diagnostics)."""
    fn: Callable[[Any], Any]


@dataclass
class ShutdownJob(Job):
    pass


@dataclass(frozen=True)
class MemoryInfo:
    total: int
    free: int


class DeviceWorker:
    def __init__(self, spec: DeviceSpec, cpu_budget_bytes: int = 0):
        self.spec = spec
        self.slab: dict[int, Shard] = {}
        self.failed: dict[int, str] = {}  # handle -> why, for shards lost with their TP group
        self.memory = MemoryInfo(cpu_budget_bytes, cpu_budget_bytes)
        self.busy = False
        self.backend = None
        self._cpu_budget = cpu_budget_bytes
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._running: list[Sequence] = []
        self._waiting: collections.deque[Job] = collections.deque()  # Generate/Forward jobs needing a slot
        self._ready = Future()
        self.failure = ""  # why the device thread ended, if it ended other than by stop()
        self.progress_at = time.monotonic()  # when the last turn (or load progress) finished
        self._thread = threading.Thread(target=self._main, name=f"device-{spec.id}", daemon=True)
        self._handlers = {
            LoadShardJob: self._load, DropShardJob: self._drop, ForwardJob: self._admit,
            GenerateJob: self._admit, ClearKvJob: self._clear_kv, FollowerStepJob: self._follow, CallJob: lambda job: job.fn(self.backend),
        }

    # -- called from other threads

    def start(self) -> None:
        self._thread.start()
        self._ready.result()  # re-raises a backend failure (no driver, bad GPU index)

    def submit(self, job: Job) -> Future:
        if not self._thread.is_alive():
            why = f": {self.failure}" if self.failure else ""
            job.future.set_exception(Unavailable(f"device {self.spec.id} worker is not running{why}"))
        else:
            self._jobs.put(job)
        return job.future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def holds_work(self) -> bool:
        """Running or waiting requests, or a job in progress: the watchdog expects turns to finish."""
        return bool(self._running or self._waiting or self.busy)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread.is_alive():
            self.submit(ShutdownJob()).result(timeout)
            self._thread.join(timeout)

    # -- the device thread

    def _main(self) -> None:
        try:
            self.backend = CudaBackend(self.spec) if self.spec.kind == "cuda" else CpuBackend(self.spec, self._cpu_budget)
            self._refresh_memory()
        except Exception as err:  # noqa: BLE001 - reported to start()
            self._ready.set_exception(err)
            return
        self._ready.set_result(None)
        try:
            self._serve()
        except BaseException as err:  # a bug: recorded so health, Describe and submit() can say why
            self.failure = f"device thread died: {err!r}"
            log.critical("device worker died", device=self.spec.id, error=repr(err), exc_info=True)

    def _serve(self) -> None:
        while True:
            job = self._next_job()
            if isinstance(job, ShutdownJob):
                self._shutdown(job)
                return
            try:
                if job is not None:
                    self._run_job(job)
                self._step_running()
                self._admit_waiting()
                self._refresh_memory()
            except Exception:  # noqa: BLE001 - one turn's bug must not end the device thread
                log.exception("device turn failed", device=self.spec.id)
            self.progress_at = time.monotonic()

    def _next_job(self) -> Job | None:
        try:
            # With sequences running, only look at the queue; otherwise sleep until work arrives.
            return self._jobs.get_nowait() if self._running else self._jobs.get()
        except queue.Empty:
            return None

    def _run_job(self, job: Job) -> None:
        if job.future.cancelled():
            return
        self.busy = True
        try:
            result = self._handlers[type(job)](job)
            if result is not _PENDING:
                _settle(job.future, result)
        except Exception as err:  # noqa: BLE001 - delivered to the caller
            _settle(job.future, error=err)
        finally:
            self.busy = False

    def _refresh_memory(self) -> None:
        total, free = self.backend.memory()
        self.memory = MemoryInfo(int(total), int(free))

    def _shard(self, handle: int) -> Shard:
        shard = self.slab.get(handle)
        if shard is None and handle in self.failed:
            raise Unavailable(f"{self.failed[handle]}; the model must be loaded again")
        if shard is None:
            raise NotFound(f"no shard with handle {handle} on device {self.spec.id}: it was dropped or never loaded")
        return shard

    # -- load / drop

    def _load(self, job: LoadShardJob) -> Shard:
        def progress(p: LoadProgress) -> None:
            self.progress_at = time.monotonic()  # a long load is progress, not a stall
            job.progress(p)

        shard = load_shard(self.backend, job.request, job.handle, progress, job.cancelled, job.comm)
        self.slab[job.handle] = shard
        self.backend.used += shard.nbytes
        log.info("shard loaded", model=job.request.model, handle=job.handle, device=self.spec.id, dtype=shard.dtype,
                 weight_bytes=shard.weight_bytes, kv_bytes=shard.kv.nbytes, seconds=round(shard.load_seconds, 3))
        return shard

    def _drop(self, job: DropShardJob, error: Exception | None = None) -> int:
        if job.handle in self.failed and job.handle not in self.slab:
            del self.failed[job.handle]  # dropping a failed shard just forgets it
            return 0
        shard = self._shard(job.handle)
        for seq in [s for s in self._running if s.handle == job.handle]:
            self._finish(seq, ErrorEvent(error or Unavailable("the model was unloaded while generating")))
        for waiting in [w for w in self._waiting if self._handle_of(w) == job.handle]:
            self._waiting.remove(waiting)
            self._reject(waiting, error or Unavailable("the model was unloaded before this request started"))
        if shard.followers is not None:
            shard.followers.close()
        del self.slab[job.handle]
        freed = shard.nbytes
        self.backend.used -= freed
        shard.model.release_graphs()  # before the communicator goes: NCCL waits for graphs that hold it
        shard.comm.close()
        del shard
        self.backend.release_cached()
        log.info("shard dropped", handle=job.handle, device=self.spec.id, freed_bytes=freed)
        return freed

    def _follow(self, job: FollowerStepJob) -> None:
        shard = self._shard(job.handle)
        try:
            shard.follow(job.token_ids, job.start, job.slot)
        except CollectiveError as err:
            raise self._fail_shard(shard, err) from None

    def _fail_shard(self, shard: Shard, err: Exception) -> Unavailable:
        """A broken TP group: fail its requests, free the shard, keep why (Describe reports it)."""
        reason = f"tensor-parallel group {shard.request.group_id!r} failed on rank {shard.layout.rank}: {err}"
        log.error("tensor-parallel group failed", handle=shard.handle, group=shard.request.group_id, error=str(err))
        shard.model.release_graphs()
        shard.comm.abort()
        if shard.followers is not None:
            shard.followers.drop_local()
        error = Unavailable(f"{reason}; the model must be loaded again")
        self.failed[shard.handle] = reason
        self._drop(DropShardJob(shard.handle), error=error)
        return error

    def _clear_kv(self, job: ClearKvJob) -> int:
        return self._shard(job.handle).kv.clear()

    # -- requests that need a KV slot

    @staticmethod
    def _handle_of(job: Job) -> int:
        return job.sequence.handle if isinstance(job, GenerateJob) else job.handle

    def _admit(self, job: Job):
        shard = self._shard(self._handle_of(job))
        slot = shard.kv.acquire()
        if slot is None:
            if len(self._waiting) >= MAX_WAITING:
                raise ResourceExhausted(f"device {self.spec.id} has {MAX_WAITING} requests waiting for a KV slot; retry later")
            self._waiting.append(job)
            return _PENDING
        return self._start(job, shard, slot)

    def _admit_waiting(self) -> None:
        for _ in range(len(self._waiting)):
            job = self._waiting.popleft()
            if job.future.cancelled():
                continue  # the caller gave up (cancelled, or past its deadline) while it waited
            shard = self.slab.get(self._handle_of(job))
            if shard is None:
                self._reject(job, NotFound("the model was dropped while this request waited"))
                continue
            slot = shard.kv.acquire()
            if slot is None:
                self._waiting.appendleft(job)
                return
            try:
                result = self._start(job, shard, slot)
                if result is not _PENDING:
                    _settle(job.future, result)
            except Exception as err:  # noqa: BLE001 - delivered to the caller
                _settle(job.future, error=err)

    def _start(self, job: Job, shard: Shard, slot: int):
        if isinstance(job, ForwardJob):
            try:
                return self._forward(shard, job, slot)
            finally:
                shard.kv.release(slot)
        seq = job.sequence
        if seq.cancelled.is_set():
            shard.kv.release(slot)
            return None
        seq.slot = slot
        self._running.append(seq)
        return None  # the caller follows the sequence's events from here

    def _reject(self, job: Job, err: Exception) -> None:
        if isinstance(job, GenerateJob):
            job.sequence.emit(ErrorEvent(err))
            _settle(job.future, None)
        else:
            _settle(job.future, error=err)

    def _forward(self, shard: Shard, job: ForwardJob, slot: int) -> np.ndarray:
        try:
            logits = shard.run(job.token_ids, 0, slot, job.all_positions)
        except CollectiveError as err:
            raise self._fail_shard(shard, err) from None
        host = logits.get() if hasattr(logits, "get") else logits
        return np.ascontiguousarray(host if job.all_positions else host[0], dtype=np.float32)

    # -- stepping running sequences

    def _step_running(self) -> None:
        for seq in list(self._running):
            if seq not in self._running:
                continue  # ended by an earlier step's failure (its TP group broke)
            shard = self.slab[seq.handle]
            if seq.cancelled.is_set():
                self._finish(seq, None)  # the caller stopped listening
                continue
            try:
                if advance(shard, seq):
                    self._finish(seq, None)
            except CollectiveError as err:
                self._fail_shard(shard, err)
            except Exception as err:  # noqa: BLE001 - the request fails, the worker lives on
                log.exception("generation step failed", handle=seq.handle, device=self.spec.id)
                self._finish(seq, ErrorEvent(err))

    def _finish(self, seq: Sequence, event) -> None:
        self._running.remove(seq)
        shard = self.slab.get(seq.handle)
        if shard is not None and seq.slot is not None:
            shard.kv.release(seq.slot)
            seq.slot = None
        if event is not None:
            seq.emit(event)

    def _shutdown(self, job: ShutdownJob) -> None:
        for seq in list(self._running):
            self._finish(seq, ErrorEvent(Unavailable(f"device {self.spec.id} is shutting down")))
        while self._waiting:
            self._reject(self._waiting.popleft(), Unavailable(f"device {self.spec.id} is shutting down"))
        for shard in self.slab.values():
            shard.model.release_graphs()
            shard.comm.close()
        self.slab.clear()
        self.backend.close()
        _settle(job.future, None)


def _settle(future: Future, result: Any = None, error: Exception | None = None) -> None:
    """Complete a job's future unless its caller already gave up on it (cancelled, or a deadline
    passed): completing a cancelled future raises InvalidStateError on the device thread."""
    try:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by the caller's thread between the check and the set
        pass
