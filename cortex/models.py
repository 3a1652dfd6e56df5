"""The model table: which models are loaded or loading under which names, where their ranks live,
and whether they can serve.

Loads are single-flight per name: the first LoadModel starts a background task, and any caller of
the same name (the first included) follows that task's progress and gets its one result. When every
caller has gone away the load is cancelled. A load that fails or is cancelled releases whatever it
took on every rank (shards, the TP group) and leaves no entry behind.

A model's state is derived when asked: READY, UNAVAILABLE while a node holding a rank is down
(it comes back with the node), FAILED once a node answers without the model's shard (the neuron
restarted) or reports the shard failed (its TP group broke): that is final, and loading the name
again replaces it.

After a cortex restart the table starts empty while the neurons still hold the models loaded
before: `adopt` (run after every poll round) takes in the shards no model holds, as READY models
named as they were loaded (see adoption.py).
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import grpc
import structlog

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.dtypes import DTYPES
from common.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound, Unavailable

from .adoption import orphans
from .api import convert
from .groups import destroy_group, form_group, new_group_id, on_all
from common.units import human_bytes

from .placement import Estimate, Placer, Target, check_pins, inspect
from .registry import Registry

log = structlog.get_logger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
MAX_TP = 64
DROP_TIMEOUT_S = 30.0
SWEEP_TIMEOUT_S = 10.0  # how long a failed load waits for its cancelled ranks' shards to go

LOADING, READY = cpb.MODEL_STATE_LOADING, cpb.MODEL_STATE_READY
UNAVAILABLE, FAILED = cpb.MODEL_STATE_UNAVAILABLE, cpb.MODEL_STATE_FAILED
ADOPTED = "adopted from the neurons after a cortex restart"


@dataclass(frozen=True)
class LoadSpec:
    """A validated LoadModelRequest."""
    name: str
    path: str
    dtype: str
    tp: int
    max_context: int
    kv_slots: int
    node: str
    device: str

    @classmethod
    def from_request(cls, req: cpb.LoadModelRequest) -> "LoadSpec":
        if not req.name:
            raise InvalidArgument("name is empty: give the name clients will call the model by")
        if not NAME_PATTERN.fullmatch(req.name):
            raise InvalidArgument(f"name {req.name[:140]!r} is not allowed: use up to 128 letters, digits and "
                                  ". _ - : /, starting with a letter or digit")
        if not req.path:
            raise InvalidArgument("path is empty: give the checkpoint directory as the neurons see it")
        if req.dtype and req.dtype not in DTYPES:
            raise InvalidArgument(f"dtype {req.dtype!r} is not one of {', '.join(DTYPES)} "
                                  "(leave it empty for the checkpoint's own)")
        if req.tp > MAX_TP:
            raise InvalidArgument(f"tp {req.tp} is larger than {MAX_TP}")
        return cls(req.name, req.path, req.dtype, max(req.tp, 1), req.max_context, req.kv_slots, req.node, req.device)


@dataclass
class Rank:
    rank: int
    node: str
    device: str
    handle: int = 0
    weight_bytes: int = 0
    kv_bytes: int = 0
    kv_slots: int = 0


@dataclass
class Model:
    spec: LoadSpec
    state: int = LOADING
    reason: str = ""
    estimate: Estimate | None = None
    ranks: list[Rank] = field(default_factory=list)
    group_id: str = ""
    architecture: str = ""
    dtype: str = ""
    max_context: int = 0
    vocab_size: int = 0
    ready_at: float = 0.0
    remark: str = ""  # shown as the estimate when there is none (an adopted model)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    listeners: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None

    def __post_init__(self):
        # Every waiter reads the outcome, but there may be none left: mark it read either way.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    def publish(self, event: cpb.LoadModelProgress | None) -> None:
        for queue in self.listeners:
            queue.put_nowait(event)

    def note(self, message: str) -> None:
        log.info(message, model=self.spec.name)
        self.publish(cpb.LoadModelProgress(message=message))

    def differences(self, spec: LoadSpec) -> list[str]:
        """How `spec` asks for something else than this model is (empty: the same model)."""
        mine = self.spec
        found = []
        if spec.path != mine.path and not (self.estimate and spec.path == self.estimate.path):
            found.append(f"path {mine.path} (asked: {spec.path})")
        if spec.dtype and spec.dtype != (self.dtype or mine.dtype):
            found.append(f"dtype {self.dtype or mine.dtype or 'default'} (asked: {spec.dtype})")
        if spec.tp != mine.tp:
            found.append(f"tp {mine.tp} (asked: {spec.tp})")
        if spec.max_context and spec.max_context != (self.max_context or mine.max_context):
            found.append(f"max_context {self.max_context or mine.max_context or 'default'} (asked: {spec.max_context})")
        return found


@dataclass(frozen=True)
class Route:
    """Where a request for a model goes: the neuron of rank 0 and its shard handle."""
    model: str
    node: str
    stub: object
    handle: int


class ModelTable:
    def __init__(self, registry: Registry, placer: Placer, group_timeout_s: float = 30.0):
        self.registry = registry
        self.placer = placer
        self.group_timeout_s = group_timeout_s
        self._models: dict[str, Model] = {}
        self._releasing = 0        # releases in progress
        self._released_at = 0.0    # when the last one finished
        self._refused: set[tuple[str, int]] = set()  # orphans not adopted (name taken), logged once

    # ------------------------------------------------------------ reading

    def state_of(self, model: Model) -> tuple[int, str]:
        if model.state != READY:
            return model.state, model.reason
        nodes = [(r, self.registry.get(r.node)) for r in model.ranks]
        # A rank that reports failure (its TP group broke) fails the model even while another
        # rank's node is down: that node coming back would not repair the group.
        for r, node in nodes:
            shard = node.shard(r.handle) if node is not None and node.up else None
            if shard is not None and shard.error:
                return self._fail(model, r, f"rank {r.rank} on {r.node} device {r.device} failed: {shard.error}; "
                                            "load the model again")
        for r, node in nodes:
            if node is None or not node.up:
                why = node.reason if node else ("it is no longer in the fleet (down longer than the expiry, so "
                                                "forgotten); it returns when the neuron registers again")
                return UNAVAILABLE, f"node {r.node} (rank {r.rank}) is down: {why}"
        for r, node in nodes:
            device = node.device(r.device)
            if device is not None and device.error:
                return UNAVAILABLE, f"device {r.device} of node {r.node} (rank {r.rank}) is unhealthy: {device.error}"
        for r, node in nodes:
            # Only a Describe asked after the load finished can tell that a shard is gone.
            if node.shard(r.handle) is None and node.described_at is not None and node.described_at > model.ready_at:
                return self._fail(model, r, f"node {r.node} no longer holds rank {r.rank} (shard {r.handle}): the "
                                            "neuron restarted or dropped it; load the model again")
        return READY, ""

    @staticmethod
    def _fail(model: Model, rank: Rank, reason: str) -> tuple[int, str]:
        """FAILED is final: the shard is gone, or its group broke, and will not come back."""
        model.state, model.reason = FAILED, reason
        log.warning("model failed", model=model.spec.name, node=rank.node, rank=rank.rank, reason=reason)
        return model.state, model.reason

    def info(self, model: Model) -> cpb.ModelInfo:
        state, reason = self.state_of(model)
        return cpb.ModelInfo(
            name=model.spec.name, path=model.spec.path, dtype=model.dtype or model.spec.dtype,
            architecture=model.architecture, state=state, reason=reason,
            max_context=model.max_context or model.spec.max_context, tp=model.spec.tp,
            placement=[cpb.Placement(rank=r.rank, node=r.node, device=r.device, handle=r.handle) for r in model.ranks],
            weight_bytes=sum(r.weight_bytes for r in model.ranks), kv_bytes=sum(r.kv_bytes for r in model.ranks),
            vocab_size=model.vocab_size, estimate=model.estimate.describe() if model.estimate else model.remark)

    def states(self) -> dict[str, int]:
        """{name: state} of every model in the table (per-model health reads it)."""
        return {name: self.state_of(m)[0] for name, m in sorted(self._models.items())}

    def list(self) -> list[cpb.ModelInfo]:
        return [self.info(m) for _, m in sorted(self._models.items())]

    def get(self, name: str) -> Model:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not loaded (loaded: {known}); load it with LoadModel first")
        return model

    def route(self, name: str) -> Route:
        model = self.get(name)
        state, reason = self.state_of(model)
        if state == LOADING:
            raise Unavailable(f"model {name} is still loading; retry once ListModels shows it READY")
        if state == UNAVAILABLE:
            raise Unavailable(f"model {name} is unavailable: {reason}; retry later, or unload and load it again")
        if state == FAILED:
            raise FailedPrecondition(f"model {name} failed: {reason}")
        leader = model.ranks[0]
        return Route(name, leader.node, self.registry.get(leader.node).stub, leader.handle)

    # ------------------------------------------------------------ loading

    async def load(self, request: cpb.LoadModelRequest):
        """Yields LoadModelResponse progress events, then the model's info (or raises its error)."""
        spec = LoadSpec.from_request(request)
        model = self._models.get(spec.name)
        previous = None
        if model is not None and self.state_of(model)[0] == FAILED:
            # Loading a failed model's name again replaces it, once what is left of it (a broken
            # group, a failed shard) is released: its devices may be needed again.
            del self._models[spec.name]
            previous, model = model, None
        if model is not None:
            differences = model.differences(spec)
            if differences:
                verb = "loading" if model.state == LOADING else "loaded"
                raise AlreadyExists(f"model {spec.name} is already {verb} with {'; '.join(differences)}; "
                                    "unload it first or use another name")
            if model.state != LOADING:
                yield cpb.LoadModelResponse(model=self.info(model))
                return
        queue: asyncio.Queue = asyncio.Queue()
        if model is None:
            model = Model(spec)
            model.listeners.add(queue)
            self._models[spec.name] = model
            model.task = asyncio.create_task(self._run(model, previous), name=f"load-{spec.name}")
            model.task.add_done_callback(lambda _: self._settle(model))
        else:
            model.listeners.add(queue)
            yield cpb.LoadModelResponse(progress=cpb.LoadModelProgress(
                message=f"{spec.name} is already being loaded by another call; following that load"))
        try:
            while (event := await queue.get()) is not None:
                yield cpb.LoadModelResponse(progress=event)
            error = model.done.exception()
            if error is not None:
                raise error
            yield cpb.LoadModelResponse(model=self.info(model))
        finally:
            model.listeners.discard(queue)
            if not model.listeners and not model.done.done() and not model.task.cancelling():
                model.task.cancel()

    async def _run(self, model: Model, previous: Model | None = None) -> None:
        spec = model.spec
        targets: list[Target] = []
        reserved = 0
        started = time.perf_counter()
        try:
            if previous is not None:
                model.note(f"releasing what is left of the failed {spec.name} first")
                await asyncio.shield(self._release(previous))
                await self.registry.refresh(r.node for r in previous.ranks)
            estimate, targets = await self._place(model)
            reserved = estimate.need_bytes
            self.placer.reserve(targets, reserved)
            if spec.tp > 1:
                model.group_id = new_group_id(spec.name)
                model.note(f"forming tensor-parallel group {model.group_id}: {spec.tp} ranks, deadline "
                           f"{self.group_timeout_s:g}s")
                await form_group(self.registry, model.group_id, targets, self.group_timeout_s)
            await self._load_ranks(model, targets)
            model.state, model.ready_at = READY, time.monotonic()
            await self.registry.refresh(t.node for t in targets)  # placement must see the memory it took
            model.done.set_result(None)
            log.info("model loaded", model=spec.name, ranks=[f"{r.node}/{r.device}" for r in model.ranks],
                     handles=[r.handle for r in model.ranks], seconds=round(time.perf_counter() - started, 3))
        except BaseException as err:  # noqa: BLE001 - including cancellation: clean up, then report
            cancelled = isinstance(err, asyncio.CancelledError)
            log.warning("model load failed", model=spec.name, error=str(err) or type(err).__name__)
            await asyncio.shield(self._release(model, sweep=True))
            if self._models.get(spec.name) is model:
                del self._models[spec.name]
            model.done.set_exception(Cancelled(f"the load of {spec.name} was cancelled: every caller went away")
                                     if cancelled else err)
            if not isinstance(err, Exception):
                raise
        finally:
            self.placer.release(targets, reserved)
            model.publish(None)

    def _settle(self, model: Model) -> None:
        """The load task ended. If it was cancelled before it could run, it took nothing and
        reported nothing: do that here, so the name does not stay LOADING for ever."""
        if model.done.done():
            return
        if self._models.get(model.spec.name) is model:
            del self._models[model.spec.name]
        model.done.set_exception(Cancelled(f"the load of {model.spec.name} was cancelled: every caller went away"))
        model.publish(None)

    async def _place(self, model: Model) -> tuple[Estimate, list[Target]]:
        spec = model.spec
        check_pins({n.address: n for n in self.registry.nodes()}, spec.node, spec.device, spec.tp)
        if not self.registry.up_nodes():
            down = "; ".join(f"{n.address}: {n.reason}" for n in self.registry.nodes())
            raise Unavailable("no neurons are up" + (f" ({down})" if down else "") +
                              "; start one with `neuron serve --cortex ADDRESS` or give cortex --neuron ADDRESS")
        candidates = self.placer.candidates(self.registry.up_nodes(), spec.node, spec.device)
        if not candidates:
            raise Unavailable("the neurons that are up report no devices yet; retry in a few seconds")
        _, node, device = candidates[0]  # the emptiest device decides the dtype default (cpu or cuda)
        estimate = await inspect(node, device, spec.path, spec.dtype, spec.max_context, spec.tp, spec.kv_slots)
        model.estimate = estimate
        model.architecture, model.dtype = estimate.architecture, estimate.dtype
        model.max_context, model.vocab_size = estimate.max_context, estimate.vocab_size
        targets = self.placer.place(self.registry.up_nodes(), estimate, spec.tp, spec.node, spec.device)
        model.ranks = [Rank(t.rank, t.node, t.device) for t in targets]
        where = ", ".join(f"rank {t.rank} on {t.where} ({human_bytes(t.free_bytes)} free)" for t in targets)
        model.note(f"placing {spec.name} ({estimate.architecture}, {estimate.dtype}, "
                   f"{human_bytes(estimate.need_bytes)} per device): {where}")
        return estimate, targets

    async def _load_ranks(self, model: Model, targets: list[Target]) -> None:
        spec, estimate = model.spec, model.estimate
        done: dict[int, int] = {}
        total: dict[int, int] = {}

        async def load_rank(t: Target) -> None:
            tp = npb.TensorParallel(group_id=model.group_id, rank=t.rank, size=spec.tp) if spec.tp > 1 else None
            # dtype and max_context as resolved by Inspect, so every rank agrees on them.
            request = npb.LoadShardRequest(path=spec.path, model=spec.name, device=t.device, dtype=estimate.dtype,
                                           max_context=estimate.max_context, max_seqs=spec.kv_slots, tp=tp)
            call = self.registry.get(t.node).stub.LoadShard(request)
            try:
                # Read to the end of the stream: a neuron drops a shard whose caller leaves early.
                async for event in call:
                    if event.HasField("loaded"):
                        info = event.loaded  # recorded at once, so that a failure from here on drops it
                        model.ranks[t.rank] = Rank(t.rank, t.node, t.device, info.handle, info.weight_bytes,
                                                   info.kv_bytes, info.max_seqs)
                        continue
                    p = event.progress
                    done[t.rank], total[t.rank] = p.bytes_done, p.bytes_total
                    model.publish(cpb.LoadModelProgress(rank=t.rank, node=t.node, device=t.device,
                                                        shard=convert.load_progress(p),
                                                        bytes_done=sum(done.values()), bytes_total=sum(total.values())))
            finally:
                call.cancel()  # no-op when finished; stops the neuron's load when this rank is abandoned
            if not model.ranks[t.rank].handle:
                raise FailedPrecondition("the neuron ended LoadShard without the shard's info")

        await on_all(targets, load_rank, "LoadShard")

    # ------------------------------------------------------------ unloading

    async def unload(self, name: str) -> int:
        model = self.get(name)
        if model.state == LOADING:
            raise FailedPrecondition(f"model {name} is still loading; unload it once the load finished "
                                     "(cancelling every LoadModel call of it also stops the load)")
        del self._models[name]  # new requests get NOT_FOUND from here on
        freed = await asyncio.shield(self._release(model))  # finishes even if the caller goes away
        await self.registry.refresh(r.node for r in model.ranks)
        log.info("model unloaded", model=name, freed_bytes=freed)
        return freed

    async def _release(self, model: Model, sweep: bool = False) -> int:
        self._releasing += 1
        try:
            return await self._drop_all(model, sweep)
        finally:
            self._releasing -= 1
            self._released_at = time.monotonic()

    async def _drop_all(self, model: Model, sweep: bool) -> int:
        """Drop every loaded rank and leave the group. Never raises: what cannot be dropped now
        (node unreachable) is dropped when the node answers again. sweep: after a failed load,
        also wait out the shards of LoadShard calls that were cancelled in flight."""
        async def drop(r: Rank) -> int:
            node = self.registry.get(r.node)
            try:
                reply = await node.stub.DropShard(npb.DropShardRequest(handle=r.handle), timeout=DROP_TIMEOUT_S)
                return reply.freed_bytes
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("drop failed", model=model.spec.name, node=r.node, handle=r.handle,
                                code=err.code().name, error=err.details())
                    self.registry.schedule_drop(r.node, r.handle)
                return 0

        freed = await asyncio.gather(*(drop(r) for r in model.ranks if r.handle))
        if model.group_id:
            ranks = [Target(r.rank, r.node, r.device, 0) for r in model.ranks]
            await destroy_group(self.registry, model.group_id, ranks)
        if sweep:
            await self._sweep(model)
        return sum(freed)

    async def _sweep(self, model: Model) -> None:
        """A cancelled LoadShard call's shard is dropped by its neuron, but only once the load job
        on the device has finished: a moment after the call ended. Wait for that (bounded), so that
        a failed load has left nothing behind when its error is reported. The model's name is
        unique in the fleet (and not reusable until this returns), so its shards are recognisable."""
        nodes = {r.node for r in model.ranks}
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while nodes:
            await self.registry.refresh(nodes)
            left = {(n.address, s.handle) for a in nodes if (n := self.registry.get(a)).up
                    for d in n.devices for s in d.shards if s.model == model.spec.name}
            if not left:
                return
            if time.monotonic() > deadline:
                for address, handle in left:
                    self.registry.schedule_drop(address, handle)
                return
            await asyncio.sleep(0.05)


    # ------------------------------------------------------------ adopting

    def adopt(self) -> None:
        """Take in the models whose shards are on the neurons but that the table does not hold
        (loaded before cortex restarted). Shards of any model in the table (loading ones included),
        of its TP group, or waiting for a deferred drop are not orphans. Nothing is adopted while a
        release runs, nor from a node last described before one finished: that Describe may still
        show the shards it dropped."""
        if self._releasing:
            return
        nodes = [n for n in self.registry.up_nodes() if n.described_at and n.described_at > self._released_at]
        taken = {(r.node, r.handle) for m in self._models.values() for r in m.ranks if r.handle}
        taken |= {(n.address, h) for n in self.registry.nodes() for h in n.pending_drops}
        groups = {m.group_id for m in self._models.values() if m.group_id}
        for ranks in orphans(nodes, taken, groups):
            lead = ranks[0].shard
            if lead.model in self._models or not NAME_PATTERN.fullmatch(lead.model):
                if (ranks[0].node, lead.handle) not in self._refused:
                    self._refused.add((ranks[0].node, lead.handle))
                    log.warning("shard not adopted: its model name is taken or not allowed; left as it is",
                                model=lead.model, node=ranks[0].node, handle=lead.handle)
                continue
            spec = LoadSpec(lead.model, lead.path, lead.dtype, max(lead.tp_size, 1), lead.max_context, 0, "", "")
            model = Model(spec, READY, group_id=lead.group_id, architecture=lead.architecture, dtype=lead.dtype,
                          max_context=lead.max_context, vocab_size=lead.vocab_size, ready_at=time.monotonic(),
                          remark=ADOPTED)
            model.ranks = [Rank(i, f.node, f.device, f.shard.handle, f.shard.weight_bytes, f.shard.kv_bytes)
                           for i, f in enumerate(ranks)]
            model.done.set_result(None)
            self._models[spec.name] = model
            log.info("model adopted", model=spec.name, ranks=[f"{f.node}/{f.device}" for f in ranks],
                     handles=[f.shard.handle for f in ranks])
