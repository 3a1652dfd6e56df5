"""A grpc.aio server with health and reflection, graceful draining, and the message-size limits
both sides use."""
from __future__ import annotations

import asyncio
import inspect
import signal

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .decode_guard import DecodeGuardInterceptor

log = structlog.get_logger(__name__)

# Logits ([tokens, vocab] float32) and load traffic exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
# What a server accepts in one request: requests are prompts and small commands (prompt sizes have
# their own, smaller, settings); only responses (logits) need MAX_MESSAGE_BYTES.
MAX_REQUEST_BYTES = 16 * 1024 * 1024

# HTTP/2 keepalive: a peer that stops answering pings (hung, SIGSTOPped, cut off) is noticed within
# KEEPALIVE_MS + KEEPALIVE_TIMEOUT_MS and its calls fail with UNAVAILABLE, instead of hanging until
# TCP gives up. Servers accept pings this often (with or without calls) and ping their clients too.
KEEPALIVE_MS = 5_000
MAX_INFLIGHT_CALLS = 8192   # default of --max-inflight-calls
PENDING_CALLS = 4 * MAX_INFLIGHT_CALLS
KEEPALIVE_TIMEOUT_MS = 5_000

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),  # what grpc >= 1.6x waits for a ping's ack
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.keepalive_time_ms", 2 * KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
    # Calls the transport accepted but the application has not picked up yet. Past grpc's default
    # (1,000) the core cancels new calls with a bare CANCELLED the application never sees (no log
    # line): 2,048 streams at once lost ~120 that way. The application's own bound is
    # --max-inflight-calls (RESOURCE_EXHAUSTED, said why); this one must stay above it.
    ("grpc.server.max_pending_requests", PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS),
]


# Never refused or counted while draining: probes and grpcurl keep working to the end.
DRAIN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM or SIGINT sets, on the running loop. Install it before the server says it
    is up (port file, log line): a supervisor or a test may signal the moment it sees that."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


class _DrainInterceptor(grpc.aio.ServerInterceptor):
    """Counts in-flight calls; refuses new ones with UNAVAILABLE once draining, and with
    RESOURCE_EXHAUSTED while `max_inflight` are running (the allowed methods excepted)."""

    def __init__(self, allow_while_draining: tuple[str, ...], max_inflight: int = MAX_INFLIGHT_CALLS):
        self.allow = allow_while_draining
        self.max_inflight = max_inflight
        self.draining = False
        self.message = "the server is shutting down; retry on another node"
        self.inflight = 0
        self._idle: asyncio.Event | None = None

    def idle(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.inflight == 0:
                self._idle.set()
        return self._idle

    def _enter(self) -> None:
        self.inflight += 1
        self.idle().clear()

    def _exit(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle().set()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(DRAIN_EXEMPT_PREFIXES):
            return handler
        if self.draining and method not in self.allow:
            return rewrap_handler(handler, lambda b: _refuse(b, grpc.StatusCode.UNAVAILABLE, self.message))
        if 0 < self.max_inflight <= self.inflight and method not in self.allow:
            log.warning("call refused: too many in flight", method=method, inflight=self.inflight)
            message = (f"this server has {self.inflight} calls in flight, its limit (--max-inflight-calls); "
                       "retry later or on another node")
            return rewrap_handler(handler, lambda b: _refuse(b, grpc.StatusCode.RESOURCE_EXHAUSTED, message))
        return rewrap_handler(handler, self._track)

    def _track(self, behavior):
        if inspect.isasyncgenfunction(behavior):
            async def tracked_stream(request, context):
                self._enter()
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    self._exit()
            return tracked_stream
        if inspect.iscoroutinefunction(behavior):
            async def tracked(request, context):
                self._enter()
                try:
                    return await behavior(request, context)
                finally:
                    self._exit()
            return tracked
        return behavior  # a sync handler (not used with grpc.aio servicers): left alone


def _refuse(behavior, code: grpc.StatusCode, message: str):
    if inspect.isasyncgenfunction(behavior):
        async def refuse_stream(request, context):
            await context.abort(code, message)
            yield  # pragma: no cover - makes this an async generator
        return refuse_stream

    async def refuse(request, context):
        await context.abort(code, message)
    return refuse


def rewrap_handler(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    kinds = {
        (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
        (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
        (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
        (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
    }
    attr, make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(wrap(getattr(handler, attr)), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class ServingServer:
    """Owns a grpc.aio server plus its health servicer; services are added before start().

    Graceful shutdown is drain() then stop(): drain() turns health NOT_SERVING, refuses new calls
    with UNAVAILABLE (health, reflection and the `allow_while_draining` methods excepted) and waits,
    up to a bound, for the calls in flight to finish."""

    def __init__(self, listen: str, allow_while_draining: tuple[str, ...] = (), interceptors: tuple = (),
                 max_inflight: int = MAX_INFLIGHT_CALLS, credentials: grpc.ServerCredentials | None = None):
        """interceptors: after the decode guard's and the drain's (auth, then metrics, as given);
        credentials: TLS (None: plaintext)."""
        self.listen = listen
        self.credentials = credentials
        self._drain = _DrainInterceptor(tuple(allow_while_draining), max_inflight)
        # Undecodable requests become INVALID_ARGUMENT first; then the drain and in-flight checks, so a
        # refused call reaches no other interceptor (nor auth, nor the metrics).
        self.server = grpc.aio.server(options=SERVER_OPTIONS,
                                      interceptors=[DecodeGuardInterceptor(), self._drain, *interceptors])
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self.port = 0

    def add(self, add_fn, servicer, service_name: str) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(service_name)

    async def start(self) -> int:
        names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        try:
            if self.credentials is None:
                self.port = self.server.add_insecure_port(self.listen)
            else:
                self.port = self.server.add_secure_port(self.listen, self.credentials)
        except RuntimeError:  # grpc >= 1.84 raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}: address in use or invalid")
        await self.server.start()
        await self.set_serving(True)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self._service_names]:
            result = self.health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    @property
    def draining(self) -> bool:
        return self._drain.draining

    @property
    def drain_message(self) -> str:
        """What calls refused while draining are told."""
        return self._drain.message

    @property
    def inflight(self) -> int:
        """Calls running now (health and reflection not counted)."""
        return self._drain.inflight

    async def drain(self, seconds: float, message: str = "") -> int:
        """Health NOT_SERVING, new calls refused with UNAVAILABLE, then wait up to `seconds` for
        the calls in flight. Returns how many are still running when it gives up (0: all done)."""
        if message:
            self._drain.message = message
        self._drain.draining = True
        await self.set_serving(False)
        try:
            await asyncio.wait_for(self._drain.idle().wait(), timeout=max(seconds, 0.0))
        except asyncio.TimeoutError:
            pass
        return self._drain.inflight

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
