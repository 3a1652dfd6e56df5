"""DeviceWorker: the one thread that touches its device.

It creates the backend (device context, stream, memory pool) on its own thread and holds the handle
slab {TpHandle: Shard}. Its loop takes the jobs that arrived (load, drop, control, new requests)
between turns, then runs one engine turn (schedule -> execute -> update) for every shard with work;
it blocks on the queue only when no shard has work. Memory and engine figures are cached after every
turn so Describe/health never wait behind a long load or turn.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from common.errors import NotFound, Unavailable
from common.heap import freeze_heap

from .collectives import CollectiveError
from .device import CpuBackend, CudaBackend, DeviceSpec
from .engine.core import Caller, settle
from .engine.request import Request
from .engine.settings import EngineSettings
from .runner.batch import BatchInputs
from .sampling import SamplingConfig
from .shard import LoadProgress, LoadRequest, Shard, load_shard

log = structlog.get_logger(__name__)

_PENDING = object()  # a handler's "no result yet": the engine completes the future later


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
    """Scoring: a request through the scheduler that samples nothing; the future gets its logits."""
    handle: int
    token_ids: list[int]
    all_positions: bool
    request_id: str = ""


@dataclass
class GenerateJob(Job):
    """The future resolves once the request is queued (or refused); tokens go to caller.emit."""
    handle: int
    request: Request
    caller: Caller


@dataclass
class ClearKvJob(Job):
    handle: int


@dataclass
class FollowerStepJob(Job):
    """Run one turn on a follower rank's shard, on the inputs its leader runs on rank 0."""
    handle: int
    inputs: BatchInputs


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
    def __init__(self, spec: DeviceSpec, cpu_budget_bytes: int = 0, settings: EngineSettings = EngineSettings()):
        self.spec = spec
        self.settings = settings
        self.slab: dict[int, Shard] = {}
        self.failed: dict[int, str] = {}  # handle -> why, for shards lost with their TP group
        self.memory = MemoryInfo(cpu_budget_bytes, cpu_budget_bytes)
        self.busy = False
        self.backend = None
        self._cpu_budget = cpu_budget_bytes
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._ready = Future()
        self._next_request = 0
        self.failure = ""  # why the device thread ended, if it ended other than by stop()
        self.progress_at = time.monotonic()  # when the last turn (or load progress) finished
        self._thread = threading.Thread(target=self._main, name=f"device-{spec.id}", daemon=True)
        self._handlers = {
            LoadShardJob: self._load, DropShardJob: self._drop, ForwardJob: self._forward,
            GenerateJob: self._generate, ClearKvJob: self._clear_kv, FollowerStepJob: self._follow,
            CallJob: lambda job: job.fn(self.backend),
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
        return self.busy or any(shard.engine.has_work() for shard in list(self.slab.values()))

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
            # Between turns: every job that arrived; sleep on the queue only when no shard has work.
            block = not any(shard.engine.has_work() for shard in self.slab.values())
            for job in self._take_jobs(block):
                if isinstance(job, ShutdownJob):
                    self._shutdown(job)
                    return
                self._run_job(job)
            try:
                self._turn()
                self._refresh_memory()
            except Exception:  # noqa: BLE001 - one turn's bug must not end the device thread
                log.exception("device turn failed", device=self.spec.id)
            self.progress_at = time.monotonic()

    def _take_jobs(self, block: bool) -> list[Job]:
        jobs = [self._jobs.get()] if block else []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _run_job(self, job: Job) -> None:
        if job.future.done():  # cancelled by its caller while queued
            return
        self.busy = True
        try:
            result = self._handlers[type(job)](job)
            if result is not _PENDING:
                settle(job.future, result)
        except Exception as err:  # noqa: BLE001 - delivered to the caller
            settle(job.future, error=err)
        finally:
            self.busy = False

    def _turn(self) -> None:
        for shard in list(self.slab.values()):
            if shard.handle not in self.slab or not shard.engine.has_work():
                continue  # dropped by an earlier shard's failure this turn
            self.busy = True
            try:
                shard.engine.step()
            except CollectiveError as err:
                self._fail_shard(shard, err)
            except Exception as err:  # noqa: BLE001 - the engine already failed the turn's requests
                log.exception("engine turn failed", handle=shard.handle, device=self.spec.id)
                shard.engine.fail_all(err)
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

        shard = load_shard(self.backend, job.request, job.handle, progress, job.cancelled, job.comm, self.settings)
        self.slab[job.handle] = shard
        self.backend.used += shard.nbytes
        gc_seconds = freeze_heap()   # the shard's objects (a KV block manager: one per block) out of collections
        log.info("shard loaded", model=job.request.model, handle=job.handle, device=self.spec.id, dtype=shard.dtype,
                 weight_bytes=shard.weight_bytes, kv_bytes=shard.kv.nbytes, kv_blocks=shard.kv.num_blocks,
                 block_size=shard.kv.block_size, max_seqs=shard.max_seqs, seconds=round(shard.load_seconds, 3),
                 async_scheduling=shard.engine.async_scheduling, gc_freeze_seconds=round(gc_seconds, 3))
        return shard

    def _drop(self, job: DropShardJob, error: Exception | None = None) -> int:
        if job.handle in self.failed and job.handle not in self.slab:
            del self.failed[job.handle]  # dropping a failed shard just forgets it
            return 0
        shard = self._shard(job.handle)
        shard.engine.fail_all(error or Unavailable("the model was unloaded while this request was in flight"))
        if shard.followers is not None:
            shard.followers.close()
        del self.slab[job.handle]
        freed = shard.nbytes
        self.backend.used -= freed
        shard.release_graphs()  # before the communicator goes: NCCL waits for graphs that hold it
        shard.comm.close()
        del shard
        freeze_heap()   # the dropped shard's frozen objects, freed by reference counts, may leave cycles
        self.backend.release_cached()
        log.info("shard dropped", handle=job.handle, device=self.spec.id, freed_bytes=freed)
        return freed

    def _follow(self, job: FollowerStepJob) -> None:
        shard = self._shard(job.handle)
        try:
            shard.engine.runner.follow(job.inputs)
        except CollectiveError as err:
            raise self._fail_shard(shard, err) from None
        except Exception as err:  # noqa: BLE001 - a rank that missed a turn is out of step with its group
            log.exception("follower turn failed", handle=shard.handle, device=self.spec.id)
            raise self._fail_shard(shard, CollectiveError(f"a turn failed on this follower: {err!r}")) from None

    def _fail_shard(self, shard: Shard, err: Exception) -> Unavailable:
        """A broken TP group: fail its requests, free the shard, keep why (Describe reports it)."""
        reason = f"tensor-parallel group {shard.request.group_id!r} failed on rank {shard.layout.rank}: {err}"
        log.error("tensor-parallel group failed", handle=shard.handle, group=shard.request.group_id, error=str(err))
        shard.release_graphs()
        shard.comm.abort()
        if shard.followers is not None:
            shard.followers.drop_local()
        error = Unavailable(f"{reason}; the model must be loaded again")
        self.failed[shard.handle] = reason
        self._drop(DropShardJob(shard.handle), error=error)
        return error

    def _clear_kv(self, job: ClearKvJob) -> int:
        return self._shard(job.handle).engine.reset_prefix_cache()

    # -- requests: queued in the shard's scheduler, served by the turns

    def _generate(self, job: GenerateJob) -> None:
        if job.caller.cancelled:
            return None
        self._shard(job.handle).engine.add(job.request, job.caller)  # ResourceExhausted when the queue is full
        return None  # the caller follows the request's events from here

    def _forward(self, job: ForwardJob):
        shard = self._shard(job.handle)
        self._next_request += 1
        request = Request(job.request_id or f"forward-{self._next_request}", list(job.token_ids),
                          SamplingConfig(max_tokens=1), shard.kv.max_context, want_logits=True,
                          all_positions=job.all_positions)
        shard.engine.add(request, Caller(future=job.future))
        return _PENDING

    def _shutdown(self, job: ShutdownJob) -> None:
        for shard in self.slab.values():
            shard.engine.fail_all(Unavailable(f"device {self.spec.id} is shutting down"))
            shard.release_graphs()
            shard.comm.close()
        self.slab.clear()
        self.backend.close()
        settle(job.future, None)
