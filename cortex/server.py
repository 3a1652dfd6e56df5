"""The cortex gRPC services: Cortex (clients) and Fleet (neurons).

Handlers validate what cortex itself can judge, then hand over to the registry and the model table,
or pass a request through to the neuron holding rank 0 of the model. A passed-through call inherits
the client's deadline (the time it has left) and is cancelled when the client goes away; a neuron's
error comes back with its own status code and the node named in the message.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.errors import (InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable, from_rpc_error,
                           rpc_method)
from common.security.credentials import ADMIN
from common.security.interceptor import AccessPolicy, caller_role

from .api import convert
from .metrics import CortexMetrics
from .models import ModelTable, Route
from .node_streams import NodeStreams
from .registry import Registry
from .stream_pacing import StreamPacer

log = structlog.get_logger("cortex.requests")

# Who may call what (with --api-keys / --cluster-token-file). A user key serves and lists models;
# everything else, ListNodes included (it shows the fleet's addresses and shard handles), and any
# method added later, needs an admin key. The Fleet service is for neurons: the cluster token.
ACCESS = AccessPolicy(cluster_services=("cortex.v1.Fleet",),
                      user_methods=frozenset({"/cortex.v1.Cortex/Generate", "/cortex.v1.Cortex/Forward",
                                              "/cortex.v1.Cortex/ListModels"}))


def _require_model(name: str) -> None:
    if not name:
        raise InvalidArgument("model is empty: give the name of a loaded model (ListModels shows them)")


MAX_PROMPT_BYTES = 1 << 20  # the default of cortex's --max-prompt-bytes
MAX_LOGITS_BYTES = 64 << 20  # the default of cortex's --max-logits-bytes


def _check_prompt(prompt: cpb.Prompt, max_bytes: int = MAX_PROMPT_BYTES) -> None:
    kind = prompt.WhichOneof("kind")
    if kind in ("text", "chat") and (size := prompt.ByteSize()) > max_bytes:
        raise InvalidArgument(f"prompt.{kind} is {size} bytes, more than cortex's limit of {max_bytes} "
                              "(--max-prompt-bytes); send a shorter prompt")
    if kind is None:
        raise InvalidArgument("prompt is empty: set prompt.text, prompt.tokens or prompt.chat")
    if kind == "tokens" and not prompt.tokens.ids:
        raise InvalidArgument("prompt.tokens.ids is empty: give at least one token id")
    if kind == "chat" and not prompt.chat.messages:
        raise InvalidArgument("prompt.chat.messages is empty: give at least one message")


def _relay(err: grpc.aio.AioRpcError, route: Route) -> ServiceError:
    return from_rpc_error(err, f"node {route.node}: ")


class _RequestLog:
    """One log line per request, with the outcome's status code."""

    def __init__(self, rpc: str, **fields):
        self.rpc, self.fields = rpc, fields
        self.started = time.perf_counter()
        self.code = "CANCELLED"  # what it stays if the client goes away mid-call
        self.cancelled_by = "client"

    def fail(self, err: BaseException) -> None:
        self.code = err.code.name if isinstance(err, ServiceError) else "INTERNAL"
        if self.code == "CANCELLED":
            self.cancelled_by = "node"  # the neuron ended the call, not our client

    def emit(self, **fields) -> None:
        if self.code == "CANCELLED":
            # A cancellation gets its own warning line saying who cancelled: a client that gave up,
            # or the neuron (e.g. it was overloaded); both are worth noticing under load.
            fields["cancelled_by"] = self.cancelled_by
            emit = log.warning
        else:
            emit = log.info
        emit(self.rpc, **self.fields, **fields, code=self.code,
             total_ms=round((time.perf_counter() - self.started) * 1e3, 2))


class CortexService(cortex_pb2_grpc.CortexServicer):
    """The gRPC handlers. `generate` and `forward` are the fronts' shared path (gRPC here, HTTP in
    cortex/http): validation, routing, request ids, errors, logs and metrics are the same for both."""

    def __init__(self, registry: Registry, models: ModelTable, metrics: CortexMetrics | None = None):
        self.registry = registry
        self.models = models
        self.metrics = metrics or CortexMetrics()
        self.max_prompt_bytes = MAX_PROMPT_BYTES
        self.max_logits_bytes = MAX_LOGITS_BYTES
        self.pacer = StreamPacer()  # tokens a client message holds after the first (stream_pacing.py)
        self.node_streams = NodeStreams(registry)

    def _model_label(self, name: str) -> str:
        try:
            return self.models.get(name).spec.name
        except NotFound:
            return ""

    @rpc_method
    async def ListNodes(self, request, context):
        now = time.monotonic()
        return cpb.ListNodesResponse(nodes=[convert.node(n, now) for n in self.registry.nodes()])

    @rpc_method
    async def ListModels(self, request, context):
        models = self.models.list()
        if caller_role() != ADMIN:  # handles address shards on the neurons: operators only
            for model in models:
                for rank in model.placement:
                    rank.handle = 0
        return cpb.ListModelsResponse(models=models)

    @rpc_method
    async def LoadModel(self, request, context):
        entry = _RequestLog("load", model=request.name, path=request.path, tp=request.tp)
        placement, followed = [], False
        try:
            async for event in self.models.load(request):
                if event.HasField("model"):
                    placement = [f"{p.node}/{p.device}" for p in event.model.placement]
                else:
                    followed = True  # a model already loaded answers with its info alone
                yield event
            entry.code = "OK"
            if followed:
                self.metrics.load.labels(request.name).observe(time.perf_counter() - entry.started)
        except Exception as err:
            entry.fail(err)
            raise
        finally:
            entry.emit(placement=placement)

    @rpc_method
    async def UnloadModel(self, request, context):
        if not request.name:
            raise InvalidArgument("name is empty: give the name of the model to unload")
        freed = await self.models.unload(request.name)
        return cpb.UnloadModelResponse(freed_bytes=freed)

    @rpc_method
    async def Generate(self, request, context):
        async for chunk in self.generate(request, context.time_remaining(), "grpc"):
            yield chunk

    async def generate(self, request, timeout: float | None, front: str):
        """Stream a generation from the neuron holding the model; raises ServiceError."""
        timer = self.metrics.generation(self._model_label(request.model), front)
        entry = _RequestLog("generate", model=request.model, front=front)
        first_token_at, completion, final = None, 0, None
        try:
            _require_model(request.model)
            _check_prompt(request.prompt, self.max_prompt_bytes)
            route = self.models.route(request.model)
            request_id = request.request_id or uuid.uuid4().hex[:16]
            entry.fields.update(node=route.node, request_id=request_id)
            # One GenerateStream call per node carries every generation routed there (node_streams.py).
            stream = self.node_streams.get(route.node, route.stub)
            timer.begin()
            async for chunk in stream.generate(convert.generate_request(request, route.handle, request_id), timeout,
                                               self.pacer):
                if chunk.token_ids and first_token_at is None:
                    first_token_at = time.perf_counter()
                completion += len(chunk.token_ids)
                timer.tokens(len(chunk.token_ids))
                if chunk.finish_reason:
                    final = chunk
                yield convert.generate_response(chunk, request_id)
            entry.code = "OK"
        except Exception as err:
            entry.fail(err)
            raise
        finally:
            timer.end(entry.code, final.usage.prompt_tokens if final else None)
            entry.emit(prompt_tokens=final.usage.prompt_tokens if final else None, completion_tokens=completion,
                       ttft_ms=round((first_token_at - entry.started) * 1e3, 2) if first_token_at else None,
                       finish=final.stop_reason if final else None)

    @rpc_method
    async def Forward(self, request, context):
        return await self.forward(request, context.time_remaining(), "grpc")

    async def forward(self, request, timeout: float | None, front: str):
        entry = _RequestLog("forward", model=request.model, front=front, tokens=len(request.token_ids),
                            all_positions=request.all_positions)
        try:
            _require_model(request.model)
            if not request.token_ids:
                raise InvalidArgument("token_ids is empty: give at least one token id")
            route = self.models.route(request.model)
            self._check_logits(request)
            entry.fields.update(node=route.node)
            call = route.stub.Forward(convert.forward_request(request, route.handle), timeout=timeout)
            tracked = self.registry.track(route.node, call)
            try:
                reply = await call
            except grpc.aio.AioRpcError as err:
                raise _relay(err, route) from None
            except asyncio.CancelledError:
                if not tracked.cut:
                    raise
                raise Unavailable(tracked.cut) from None
            finally:
                self.registry.untrack(route.node, tracked)
                call.cancel()
            entry.code = "OK"
            return convert.forward_response(reply)
        except Exception as err:
            entry.fail(err)
            raise
        finally:
            self.metrics.forward_done(self._model_label(request.model), front, entry.code)
            entry.emit()

    def _check_logits(self, request) -> None:
        vocab = self.models.get(request.model).vocab_size
        rows = len(request.token_ids) if request.all_positions else 1
        if vocab and rows * vocab * 4 > self.max_logits_bytes:
            raise ResourceExhausted(f"logits for {rows} positions x {vocab} vocab are {rows * vocab * 4} bytes, over "
                                    f"cortex's limit of {self.max_logits_bytes} (--max-logits-bytes); ask for fewer "
                                    "positions (all_positions=false returns the last one)")


class FleetService(cortex_pb2_grpc.FleetServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

    @rpc_method
    async def Register(self, request, context):
        await self.registry.register(request.address, request.host, request.version)
        return cpb.RegisterResponse(heartbeat_interval_s=self.registry.heartbeat_interval)

    @rpc_method
    async def Heartbeat(self, request, context):
        if not request.address:
            raise InvalidArgument("address is empty: send the address the neuron registered with")
        return cpb.HeartbeatResponse(known=self.registry.heartbeat(request.address))
