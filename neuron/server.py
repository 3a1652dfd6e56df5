"""The neuron gRPC service: thin async handlers that validate, queue a job on the right device
worker and translate its results (and errors) into messages and statuses."""
from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from common.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                            Unavailable, clip, rpc_method)
from common.rpc.channels import PLAINTEXT, ChannelSecurity
from common.security.interceptor import AccessPolicy
from common.server import MAX_MESSAGE_BYTES

from . import __version__, comm_nccl, comm_tcp
from .collectives import UNIQUE_ID_BYTES, CollectiveError
from .engine.core import Caller
from .engine.request import Request
from .groups import Followers, Group, GroupTable, inputs_of
from .health import device_error
from .limits import Limits
from .loader import resolve_checkpoint
from .runner.batch import BatchInputs
from .sampling import resolve_sampling
from .service.convert import graph_fields, sampling_request
from .service.generate_stream import Generation, GenerationStream
from .service.responses import ResponseBuilder, responses
from .shard import LoadRequest, Shard, plan_load
from .tokenizer import TextStream
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from .worker import (CallJob, ClearKvJob, DeviceWorker, DropShardJob, FollowerStepJob, ForwardJob, GenerateJob,
                     LoadShardJob)

log = structlog.get_logger(__name__)

# Every neuron RPC is for cortex and peer neurons: the cluster token (with --cluster-token-file).
ACCESS = AccessPolicy(cluster_services=("neuron.v1.Neuron",))


class NeuronService(neuron_pb2_grpc.NeuronServicer):
    def __init__(self, workers: list[DeviceWorker], model_roots: list[Path], advertise: str = "",
                 peer_channels: ChannelSecurity = PLAINTEXT, rendezvous: comm_tcp.Rendezvous = comm_tcp.OPEN_RENDEZVOUS):
        self.workers = {w.spec.id: w for w in workers}
        self.model_roots = model_roots
        self.advertise = advertise
        self.peer_channels = peer_channels   # follower streams to other neurons
        self.rendezvous = rendezvous         # CPU groups' sockets
        self.group_bind_host = ""            # where CPU groups' rank 0 listens (default: the advertised host)
        self._handle_owner: dict[int, DeviceWorker] = {}
        self.groups = GroupTable()
        self._issued: set[int] = set()
        self.stall_seconds = 0.0  # the progress watchdog's time (0: off); Describe reports stalls past it
        self.limits = Limits()
        # Tokenizing and chat templating run here, never on the event loop (a few threads: a flood
        # of long prompts queues instead of taking every core).
        self._prompt_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prompt")
        self.metrics = None                      # NeuronMetrics, for GenerateStream's generations
        # While the server drains: the message its refusals carry ("" when serving); GenerateStream
        # refuses new generations with it and ends once idle.
        self.drain_message: Callable[[], str] = lambda: ""

    # ------------------------------------------------------------ helpers

    def _mint_handle(self) -> int:
        """Opaque, never reused 64-bit ids (random, so not guessable from earlier ones)."""
        while True:
            handle = secrets.randbits(64)
            if handle and handle not in self._issued:
                self._issued.add(handle)
                return handle

    def _lookup(self, handle: int) -> tuple[DeviceWorker, Shard]:
        worker = self._handle_owner.get(handle)
        shard = worker.slab.get(handle) if worker else None
        if shard is None and worker is not None and handle in worker.failed:
            raise Unavailable(f"{worker.failed[handle]}; the model must be loaded again")
        if shard is None:
            raise NotFound(f"unknown shard handle {handle}: it was dropped or never loaded on this neuron")
        return worker, shard

    def model_of(self, handle: int) -> str:
        """The model name of a shard handle, "" if it is not loaded here (metrics' label)."""
        worker = self._handle_owner.get(handle)
        shard = worker.slab.get(handle) if worker else None
        return shard.request.model if shard else ""

    def _pick_device(self, device: str) -> DeviceWorker:
        if device:
            if device not in self.workers:
                raise InvalidArgument(f"device {clip(device)!r} is not on this neuron; devices: {', '.join(self.workers)}")
            return self.workers[device]
        return max(self.workers.values(), key=lambda w: w.memory.free)

    def describe_devices(self) -> list[pb.Device]:
        devices = []
        for w in self.workers.values():
            shards = [shard_summary(h, s) for h, s in list(w.slab.items())]
            shards += [pb.ShardSummary(handle=h, error=why) for h, why in list(w.failed.items())]
            devices.append(pb.Device(id=w.spec.id, kind=w.spec.kind, name=w.backend.name if w.backend else "",
                                     total_bytes=w.memory.total, free_bytes=w.memory.free, shards=shards, busy=w.busy,
                                     error=device_error(w, self.stall_seconds)))
        return devices

    # ------------------------------------------------------------ RPCs

    @rpc_method
    async def Describe(self, request, context):
        kinds = {w.spec.kind for w in self.workers.values()}
        backend = "numpy"
        if "cuda" in kinds:
            import cupy
            backend = f"cupy {cupy.__version__}"
        return pb.DescribeResponse(host=socket.gethostname(), version=__version__, backend=backend,
                                   devices=self.describe_devices(), address=self.advertise)

    @rpc_method
    async def Inspect(self, request, context):
        worker = self._pick_device(request.device) if request.device else next(iter(self.workers.values()))
        directory = resolve_checkpoint(request.path, self.model_roots)
        plan = await asyncio.to_thread(plan_load, directory, request.dtype, worker.spec.kind, request.max_context,
                                       0, max(request.tp_size, 1))
        plan.checkpoint.close()
        return pb.InspectResponse(
            path=str(directory), architecture=plan.config.architecture, dtype=plan.dtype,
            num_parameters=plan.num_parameters, weight_bytes_per_rank=plan.weight_bytes,
            kv_bytes_per_slot=plan.kv_bytes_per_slot, max_context=plan.max_context,
            vocab_size=plan.config.vocab_size, workspace_bytes=plan.workspace_bytes, estimate=plan.describe(),
            default_kv_slots=1)  # the KV pool takes a share of the memory left; the least it accepts is one sequence

    @rpc_method
    async def LoadShard(self, request, context):
        worker = self._pick_device(request.device)
        directory = resolve_checkpoint(request.path, self.model_roots)
        tp_size = max(request.tp.size, 1)
        if request.max_seqs > self.limits.max_seqs_limit:
            raise InvalidArgument(f"max_seqs {request.max_seqs} is more than this neuron's limit of "
                                  f"{self.limits.max_seqs_limit} running requests per shard (--max-seqs-limit)")
        if request.tp.rank >= tp_size:
            raise InvalidArgument(f"tp.rank {request.tp.rank} must be below tp.size {tp_size}")
        load = LoadRequest(directory=directory, model=request.model or directory.name, dtype=request.dtype,
                           max_context=request.max_context, max_seqs=request.max_seqs, tp_rank=request.tp.rank,
                           tp_size=tp_size, group_id=request.tp.group_id)
        comm = None
        if tp_size > 1:
            comm = self.group_communicator(request.tp.group_id, worker, tp_size, request.tp.rank)
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        handle = self._mint_handle()
        job = LoadShardJob(load, handle, lambda p: loop.call_soon_threadsafe(progress.put_nowait, p), cancelled, comm)
        future = asyncio.wrap_future(worker.submit(job))
        delivered = False
        try:
            while not future.done() or not progress.empty():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    p = getter.result()
                    yield pb.LoadShardResponse(progress=pb.LoadProgress(
                        stage=p.stage, bytes_done=p.bytes_done, bytes_total=p.bytes_total,
                        tensors_done=p.tensors_done, tensors_total=p.tensors_total, gb_per_s=p.gb_per_s))
                else:
                    getter.cancel()
            shard = future.result()
            self._handle_owner[handle] = worker
            if tp_size > 1:
                self._on_group_shard_loaded(self.groups.groups[(request.tp.group_id, request.tp.rank)], shard)
            log.info("load served", model=load.model, handle=handle, device=worker.spec.id)
            yield pb.LoadShardResponse(loaded=self.shard_info(shard, worker))
            delivered = True
        finally:
            if not delivered:
                # The caller went away (or it failed): a load that still completes must not linger.
                cancelled.set()
                future.add_done_callback(lambda f: self._discard(worker, handle, f))

    def _discard(self, worker: DeviceWorker, handle: int, future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._handle_owner.pop(handle, None)
            worker.submit(DropShardJob(handle))

    def shard_info(self, shard: Shard, worker: DeviceWorker) -> pb.ShardInfo:
        return pb.ShardInfo(handle=shard.handle, model=shard.request.model, device=worker.spec.id,
                            architecture=shard.config.architecture, dtype=shard.dtype,
                            num_parameters=shard.num_parameters, weight_bytes=shard.weight_bytes,
                            kv_bytes=shard.kv.nbytes, max_context=shard.kv.max_context, max_seqs=shard.max_seqs,
                            vocab_size=shard.config.vocab_size, tp_rank=shard.layout.rank, tp_size=shard.layout.size,
                            load_seconds=shard.load_seconds, path=str(shard.request.directory),
                            kv_block_size=shard.kv.block_size, kv_blocks_total=shard.kv.num_blocks,
                            kv_tokens=shard.kv.tokens, warm_up_seconds=shard.warm_up_seconds,
                            **graph_fields(shard.engine.runner.graphs))

    @rpc_method
    async def DropShard(self, request, context):
        worker = self._handle_owner.get(request.handle)
        if worker is None or (request.handle not in worker.slab and request.handle not in worker.failed):
            raise NotFound(f"unknown shard handle {request.handle}: it was dropped or never loaded on this neuron")
        freed = await asyncio.wrap_future(worker.submit(DropShardJob(request.handle)))
        self._handle_owner.pop(request.handle, None)
        return pb.DropShardResponse(freed_bytes=freed)

    @rpc_method
    async def ClearKv(self, request, context):
        worker, _ = self._lookup(request.handle)
        cleared = await asyncio.wrap_future(worker.submit(ClearKvJob(request.handle)))
        return pb.ClearKvResponse(blocks_cleared=cleared)

    @rpc_method
    async def Forward(self, request, context):
        worker, shard = self._lookup(request.handle)
        ids = list(request.token_ids)
        _check_token_ids(ids, shard, "token_ids")
        rows = len(ids) if request.all_positions else 1
        size = rows * shard.config.vocab_size * 4
        limit = min(self.limits.max_logits_bytes, MAX_MESSAGE_BYTES - (1 << 20))
        if size > limit:
            raise ResourceExhausted(f"logits for {rows} positions x {shard.config.vocab_size} vocab are {size} bytes, "
                                    f"over the limit of {limit} (--max-logits-bytes); ask for fewer positions "
                                    "(all_positions=false returns the last one)")
        logits = await asyncio.wrap_future(worker.submit(ForwardJob(request.handle, ids, request.all_positions)))
        return pb.ForwardResponse(logits=pb.Tensor(shape=list(logits.shape), dtype="float32",
                                                   data=logits.astype("<f4", copy=False).tobytes()))

    @rpc_method
    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        generation = await self.prepare_generation(
            request, Caller(emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)))
        try:
            await generation.submit()
            async for message in responses(events, generation.builder):
                yield message
            generation.log_done(message.timing)
        finally:
            # No-op when the device finished; the engine aborts the request after a stop string, or
            # when the caller went away.
            generation.caller.cancel()

    @rpc_method
    async def GenerateStream(self, request_iterator, context):
        async for message in GenerationStream(self, self.metrics, self.drain_message).serve(request_iterator):
            yield message

    async def prepare_generation(self, request: pb.GenerateRequest, caller: Caller) -> Generation:
        """A Generate request checked and made ready for its device (`Generation.submit`); `caller`
        receives its events from the device thread. Raises ServiceError for bad input."""
        started = time.perf_counter()
        worker, shard = self._lookup(request.handle)
        prompt_ids = await self._prompt_ids(shard, request.prompt)
        context_left = shard.kv.max_context - len(prompt_ids)
        sampling = resolve_sampling(sampling_request(request.sampling), shard.generation_config, context_left=context_left,
                                    vocab_size=shard.config.vocab_size)
        if sampling.stop and shard.tokenizer is None:
            raise FailedPrecondition(f"{shard.request.model} has no tokenizer.json, so stop strings cannot be matched; "
                                     "use stop_token_ids")
        text = TextStream(shard.tokenizer, list(sampling.stop)) if shard.tokenizer else None
        request_id = request.request_id or f"neuron-{secrets.token_hex(8)}"
        builder = ResponseBuilder(request_id, len(prompt_ids), text, started)
        # The engine's id is unique per shard even when callers reuse theirs.
        engine_request = Request(f"{request_id}-{secrets.token_hex(6)}", prompt_ids, sampling, shard.kv.max_context,
                                 eos_ids=frozenset(shard.eos_ids()))
        return Generation(request.handle, shard.request.model, builder, caller, worker,
                          GenerateJob(request.handle, engine_request, caller))

    async def _prompt_ids(self, shard: Shard, prompt: pb.Prompt) -> list[int]:
        check_prompt_size(prompt, self.limits)
        if prompt.WhichOneof("kind") == "tokens":
            # Token ids need no tokenizer: checked here, since a hop through the pool (a thread
            # wake-up and a future back to the loop) cost more than the check, and a burst of such
            # hops competes for the GIL with the device thread launching a turn.
            ids = prompt_token_ids(shard, prompt)
        else:
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(self._prompt_pool, prompt_token_ids, shard, prompt,
                                             self.limits.template_seconds)
        if len(ids) > self.limits.max_prompt_tokens:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens, more than the limit of "
                                  f"{self.limits.max_prompt_tokens} (--max-prompt-tokens); send a shorter prompt")
        return ids

    # ------------------------------------------------------------ tensor parallelism

    def group_communicator(self, group_id: str, worker: DeviceWorker, size: int, rank: int):
        group = self.groups.groups.get((group_id, rank))
        if group is None:
            raise FailedPrecondition(f"this neuron has no rank {rank} of group {group_id!r}: call InitGroup first")
        if group.size != size or group.worker is not worker:
            raise FailedPrecondition(f"group {group_id!r} rank {rank} is on device {group.worker.spec.id} with size "
                                     f"{group.size}; the load asked for device {worker.spec.id} and size {size}")
        if group.handle is not None:
            raise FailedPrecondition(f"group {group_id!r} rank {rank} already holds shard {group.handle}")
        return group.comm

    def _on_group_shard_loaded(self, group: Group, shard: Shard) -> None:
        group.handle = shard.handle
        if group.rank == 0:
            shard.followers = group.followers = Followers(group, self.groups, asyncio.get_running_loop(),
                                                          self._submit_follower_step, self.peer_channels)
            shard.engine.runner.announce = shard.followers.step

    def _submit_follower_step(self, group: Group, inputs: BatchInputs):
        if group.handle is not None:
            return group.worker.submit(FollowerStepJob(group.handle, inputs))
        return None

    @rpc_method
    async def CreateGroupId(self, request, context):
        worker = self._pick_device(request.device)
        if worker.spec.kind == "cuda":
            return pb.CreateGroupIdResponse(unique_id=comm_nccl.create_group_id())
        host = self.advertise.rsplit(":", 1)[0].strip("[]") if self.advertise else "127.0.0.1"
        try:
            uid = comm_tcp.create_group_id(host, self.group_bind_host)
        except comm_tcp.TooManyGroupIds as err:
            raise ResourceExhausted(f"{err}; form or destroy the pending groups first") from None
        except OSError as err:
            raise FailedPrecondition(f"cannot listen for the group's ranks on {self.group_bind_host or host}: {err}; "
                                     "--advertise (or --listen) must name an address of this host") from None
        return pb.CreateGroupIdResponse(unique_id=uid)

    @rpc_method
    async def InitGroup(self, request, context):
        _check_init_group(request)
        worker = self._pick_device(request.device)
        if (request.group_id, request.rank) in self.groups.groups:
            raise FailedPrecondition(f"rank {request.rank} of group {request.group_id!r} already joined")
        busy = self.groups.on_device(worker.spec.id)
        if busy is not None:
            # Two groups sharing devices can deadlock (each leader waits in a collective the other
            # group's follower job sits behind), so a device serves one group at a time.
            raise FailedPrecondition(f"device {worker.spec.id} is already rank {busy.rank} of group {busy.id!r}; "
                                     "one tensor-parallel group per device")
        cap = self.limits.max_group_timeout_ms
        join_timeout = min(request.timeout_ms or 30_000, cap) / 1000  # a huge timeout would hold the device
        step_timeout = min(request.step_timeout_ms or 30_000, cap) / 1000
        uid, rank, size = bytes(request.unique_id), request.rank, request.world_size

        def connect(backend):
            if comm_tcp.is_tcp_group_id(uid):
                if backend.kind != "cpu":
                    raise InvalidArgument("a CPU group id cannot join a GPU device")
                return comm_tcp.TcpCommunicator(uid, rank, size, join_timeout, step_timeout, self.rendezvous)
            if backend.kind != "cuda":
                raise InvalidArgument("an NCCL group id cannot join a CPU device")
            return comm_nccl.NcclCommunicator(uid, rank, size, backend.stream, step_timeout)

        try:
            comm = await asyncio.wait_for(asyncio.wrap_future(worker.submit(CallJob(connect))), join_timeout + 5)
        except CollectiveError as err:
            raise DeadlineExceeded(f"group {request.group_id!r} rank {rank}: {err}") from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"group {request.group_id!r} rank {rank} did not form within {join_timeout:g} s") from None
        self.groups.groups[(request.group_id, rank)] = Group(
            request.group_id, rank, size, worker, comm, list(request.members), step_timeout)
        log.info("joined group", group=request.group_id, rank=rank, size=size, device=worker.spec.id)
        return pb.InitGroupResponse()

    def _ranks(self, group_id: str) -> list[Group]:
        ranks = self.groups.ranks_of(group_id)
        if not ranks:
            raise NotFound(f"this neuron holds no rank of group {clip(group_id)!r}")
        return ranks

    @rpc_method
    async def GroupSanity(self, request, context):
        def all_reduce_ones(group):
            def run(backend):
                xp = backend.xp
                total = group.comm.all_reduce(xp.ones(1, dtype=xp.float32))
                return float(total[0])
            return run

        values = await asyncio.gather(*(asyncio.wrap_future(g.worker.submit(CallJob(all_reduce_ones(g))))
                                        for g in self._ranks(request.group_id)))
        return pb.GroupSanityResponse(value=min(values))

    @rpc_method
    async def DestroyGroup(self, request, context):
        for group in self._ranks(request.group_id):
            if group.handle is not None and group.handle in group.worker.slab:
                await asyncio.wrap_future(group.worker.submit(DropShardJob(group.handle)))
                self._handle_owner.pop(group.handle, None)
            await asyncio.wrap_future(group.worker.submit(CallJob(lambda backend, g=group: g.comm.close())))
            del self.groups.groups[(group.id, group.rank)]
        return pb.DestroyGroupResponse()

    async def FollowSteps(self, request_iterator, context):
        """Follower side of the leader's step stream: run each step on this neuron's ranks."""
        group_id = None
        try:
            async for command in request_iterator:
                group_id = command.group_id
                ranks = [g for g in self.groups.ranks_of(command.group_id) if g.rank and g.handle is not None]
                if not ranks:
                    yield pb.StepAck(step=command.step, error=f"no follower rank of group {command.group_id!r} here")
                    continue
                inputs = inputs_of(command)
                futures = [asyncio.wrap_future(g.worker.submit(FollowerStepJob(g.handle, inputs))) for g in ranks]
                errors = [r for r in await asyncio.gather(*futures, return_exceptions=True) if isinstance(r, Exception)]
                yield pb.StepAck(step=command.step, error="; ".join(str(e) for e in errors))
        except asyncio.CancelledError:
            # The leader went away mid-stream (its process died): free this group's shards here.
            if group_id is not None:
                log.warning("leader stream broke; dropping group shards", group=group_id)
                for g in self.groups.ranks_of(group_id):
                    if g.handle is not None and g.handle in g.worker.slab:
                        g.worker.submit(DropShardJob(g.handle))
            raise


def _check_init_group(request: pb.InitGroupRequest) -> None:
    if not request.group_id:
        raise InvalidArgument("group_id is empty")
    if len(request.group_id) > 256:
        raise InvalidArgument(f"group_id is {len(request.group_id)} characters; ids from cortex are far shorter")
    if request.world_size < 2 or request.rank >= request.world_size:
        raise InvalidArgument(f"need world_size >= 2 and rank < world_size; got rank {request.rank} of {request.world_size}")
    if len(request.unique_id) != UNIQUE_ID_BYTES:
        raise InvalidArgument(f"unique_id must be {UNIQUE_ID_BYTES} bytes (from CreateGroupId), got {len(request.unique_id)}")
    if comm_tcp.is_tcp_group_id(request.unique_id):
        try:
            comm_tcp.check_group_id(bytes(request.unique_id))
        except ValueError as err:
            raise InvalidArgument(f"unique_id: {err}") from None
    if len(request.members) != request.world_size:
        raise InvalidArgument(f"members lists {len(request.members)} ranks, world_size is {request.world_size}: "
                              "give every rank's neuron address and device, in rank order")


def _check_token_ids(ids: list[int], shard: Shard, field: str) -> None:
    if not ids:
        raise InvalidArgument(f"{field} is empty: give at least one token id")
    vocab = shard.config.vocab_size
    if max(ids) >= vocab:  # max() runs in C; the scan for the culprit only on the error path
        index, bad = next((i, t) for i, t in enumerate(ids) if t >= vocab)
        raise InvalidArgument(f"{field}[{index}] = {bad} is out of the vocabulary (ids must be below {vocab})")
    if len(ids) > shard.kv.max_context:
        raise InvalidArgument(f"{field} has {len(ids)} tokens, more than the context of {shard.kv.max_context}; "
                              "send fewer tokens or load the model with a larger max_context")


def check_prompt_size(prompt: pb.Prompt, limits: Limits) -> None:
    kind = prompt.WhichOneof("kind")
    if kind == "tokens" and len(prompt.tokens.ids) > limits.max_prompt_tokens:
        raise InvalidArgument(f"prompt.tokens has {len(prompt.tokens.ids)} ids, more than the limit of "
                              f"{limits.max_prompt_tokens} (--max-prompt-tokens); send a shorter prompt")
    if kind in ("text", "chat") and (size := prompt.ByteSize()) > limits.max_prompt_bytes:
        raise InvalidArgument(f"prompt.{kind} is {size} bytes, more than the limit of {limits.max_prompt_bytes} "
                              "(--max-prompt-bytes); send a shorter prompt")


def prompt_token_ids(shard: Shard, prompt: pb.Prompt, template_seconds: float = 2.0) -> list[int]:
    """Token ids of a prompt (tokenizing or templating it: call it off the event loop)."""
    kind = prompt.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("prompt is empty: set prompt.text, prompt.tokens or prompt.chat")
    if kind == "tokens":
        ids = list(prompt.tokens.ids)
    else:
        if shard.tokenizer is None:
            raise FailedPrecondition(f"{shard.request.model} has no tokenizer.json: send prompt.tokens instead of {kind}")
        if kind == "text":
            ids = shard.tokenizer.encode(prompt.text)
        else:
            messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
            if not messages:
                raise InvalidArgument("prompt.chat.messages is empty")
            ids = shard.tokenizer.encode_chat(messages, template_seconds)
    _check_token_ids(ids, shard, f"prompt.{kind}")
    if len(ids) >= shard.kv.max_context:
        raise InvalidArgument(f"the prompt has {len(ids)} tokens but the context holds {shard.kv.max_context}, "
                              "leaving no room to generate; shorten it or load with a larger max_context")
    return ids


def logits_from_tensor(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape))


def shard_summary(handle: int, shard: Shard) -> pb.ShardSummary:
    stats = shard.engine.stats  # cached by the device thread after every turn
    return pb.ShardSummary(
        handle=handle, model=shard.request.model, dtype=shard.dtype, weight_bytes=shard.weight_bytes,
        kv_bytes=shard.kv.nbytes, tp_rank=shard.layout.rank, tp_size=shard.layout.size,
        group_id=shard.request.group_id, path=str(shard.request.directory), architecture=shard.config.architecture,
        max_context=shard.kv.max_context, vocab_size=shard.config.vocab_size, kv_block_size=shard.kv.block_size,
        kv_blocks_total=shard.kv.num_blocks, kv_tokens=shard.kv.tokens, max_seqs=shard.max_seqs,
        running=stats.running, waiting=stats.waiting, kv_blocks_used=stats.kv.blocks_used,
        prefix_cache_queries=stats.kv.queries, prefix_cache_hits=stats.kv.hits,
        warm_up_seconds=shard.warm_up_seconds, **graph_fields(shard.engine.runner.graphs))
