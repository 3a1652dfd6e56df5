"""The HTTP front: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, /health and
/metrics, on cortex's own event loop beside grpc.aio.

Every generation goes through CortexService.generate, the function the gRPC Generate handler
calls, so routing, request ids, errors, logs and metrics are the same on both fronts. A client that
disconnects cancels its handler (aiohttp's handler_cancellation), which cancels the neuron call.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from contextlib import aclosing

import grpc
import structlog
from aiohttp import web

from common.errors import ServiceError
from common.metrics import metrics_response, start_site
from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.security.interceptor import Authenticator, Refusal

from . import openai_api
from .auth import authorize_request
from .errors import ApiError, bad_request, failed_model_error, from_service_error, internal_error

log = structlog.get_logger("cortex.http")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMEOUT_HEADER = "X-Request-Timeout"  # seconds: the HTTP counterpart of a gRPC deadline
# Served while draining, so probes and scrapers see the shutdown instead of a refused connection.
ALWAYS_SERVED = ("/health", "/metrics", "/v1/models")  # and /v1/models/NAME
MAX_BODY_BYTES = 16 * 1024 * 1024  # long token-id prompts exceed aiohttp's 1 MiB default


class HttpFront:
    def __init__(self, service, authenticator: Authenticator | None = None):
        self.service = service              # cortex.server.CortexService
        self.authenticator = authenticator or Authenticator()  # no keys configured: open
        self.started = int(time.time())
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._errors, self._authorize, self._track],
                                   client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", lambda request: metrics_response(self.service.metrics.registry))
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{name:.+}", self.get_model)  # names may hold "/"
        self.app.router.add_post("/v1/completions", lambda request: self.complete(request, chat=False))
        self.app.router.add_post("/v1/chat/completions", lambda request: self.complete(request, chat=True))

    async def start(self, listen: str, ssl_context=None) -> int:
        """ssl_context: HTTPS (cortex's --tls-cert); None: HTTP."""
        self._runner, port = await start_site(self.app, listen, ssl_context=ssl_context, handler_cancellation=True)
        return port

    async def drain(self, seconds: float) -> int:
        """Refuse new generations with 503 and wait up to `seconds` for those in flight."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=max(seconds, 0.0))
        except asyncio.TimeoutError:
            pass
        return self.inflight

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # cancels the handlers still running, and so their neuron calls

    # ------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Request ids and OpenAI-shaped errors for everything below."""
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
        if not REQUEST_ID.fullmatch(request_id):
            response = bad_request("X-Request-Id must be 1 to 128 letters, digits or . _ : -").response()
        else:
            request["request_id"] = request_id
            try:
                response = await handler(request)
            except ApiError as err:
                response = err.response()
            except web.HTTPException as err:  # aiohttp's own: unknown path, wrong method
                response = ApiError(err.status, f"{request.method} {request.path}: {err.reason}",
                                    "invalid_request_error").response()
            except Exception as err:  # noqa: BLE001 - a bug: logged, answered with 500
                log.exception("internal error", path=request.path)
                response = internal_error(err).response()
        if not response.prepared:
            response.headers["X-Request-Id"] = request_id
        return response

    @web.middleware
    async def _authorize(self, request: web.Request, handler):
        """API keys, as on the gRPC API: `Authorization: Bearer KEY`; 401 without a known key, 403
        for a user key on an admin route (cortex/http/auth.py says which routes need what)."""
        try:
            request["role"] = authorize_request(self.authenticator, request.method, request.path, request.headers)
        except Refusal as refusal:
            if refusal.code == grpc.StatusCode.UNAUTHENTICATED:
                error = ApiError(401, refusal.message, "authentication_error", None, "invalid_api_key")
                response = error.response()
                response.headers["WWW-Authenticate"] = 'Bearer realm="cortex"'
                return response
            raise ApiError(403, refusal.message, "permission_error", None, "permission_denied") from None
        return await handler(request)

    @web.middleware
    async def _track(self, request: web.Request, handler):
        if request.path in ALWAYS_SERVED or request.path.startswith("/v1/models/"):
            return await handler(request)
        if self.draining:
            raise ApiError(503, "cortex is shutting down (draining): it takes no new requests; retry against "
                           "another cortex or once it is back", "service_unavailable_error", None, "draining")
        self.inflight += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    # ------------------------------------------------------------ handlers

    async def health(self, request: web.Request) -> web.Response:
        up = len(self.service.registry.up_nodes())
        if self.draining:
            reason = "cortex is draining (shutting down)"
        elif not up:
            nodes = self.service.registry.nodes()
            reason = ("no neurons are up: " + "; ".join(f"{n.address}: {n.reason}" for n in nodes)) if nodes else \
                "no neurons are known: start one with `neuron serve --cortex ADDRESS`"
        else:
            return web.json_response({"status": "ok", "nodes_up": up})
        raise ApiError(503, reason, "service_unavailable_error", None, "not_serving")

    def _ready_models(self) -> dict[str, dict]:
        return {m.name: {"id": m.name, "object": "model", "created": self.started, "owned_by": "cortex",
                         "max_model_len": m.max_context}
                for m in self.service.models.list() if m.state == cpb.MODEL_STATE_READY}

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": list(self._ready_models().values())})

    async def get_model(self, request: web.Request) -> web.Response:
        ready = self._ready_models()
        name = request.match_info["name"]
        if name not in ready:
            raise ApiError(404, f"model {name!r} is not ready (ready: {', '.join(sorted(ready)) or 'none'}); "
                           "GET /v1/models lists the models that can serve", "invalid_request_error", "model",
                           "model_not_found")
        return web.json_response(ready[name])

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        completion = openai_api.parse(body, chat)
        request_id = request["request_id"]
        completion.request.request_id = request_id
        timeout = _timeout(request)
        chunks = self.service.generate(completion.request, timeout, "http")
        if completion.stream:
            return await self._stream(request, completion, chunks, request_id)
        text, finish, used = [], None, None
        try:
            async with aclosing(chunks):
                async for chunk in chunks:
                    text.append(chunk.text)
                    if chunk.finish_reason:
                        finish = openai_api.finish_reason(chunk)
                        used = openai_api.usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        except ServiceError as err:
            raise self._api_error(err, completion.model) from None
        return web.json_response(openai_api.full_response(completion, request_id, "".join(text), finish, used))

    def _api_error(self, err: ServiceError, model: str) -> ApiError:
        """FAILED_PRECONDITION is a 400 (the request cannot work, e.g. stop strings without a
        tokenizer) unless the model itself failed: then the service cannot serve it, a 503."""
        try:
            failed = self.service.models.state_of(self.service.models.get(model))[0] == cpb.MODEL_STATE_FAILED
        except ServiceError:
            failed = False
        return failed_model_error(err) if failed and err.code.name == "FAILED_PRECONDITION" else from_service_error(err)

    async def _stream(self, request, completion, chunks, request_id: str) -> web.StreamResponse:
        """Server-sent events: one `data:` line per chunk, an error event if it fails midway, then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Request-Id": request_id})
        first = True
        async with aclosing(chunks):
            try:
                async for chunk in chunks:
                    if not response.prepared:
                        await response.prepare(request)
                    finish = openai_api.finish_reason(chunk)
                    if chunk.text or (first and completion.chat):
                        await _send(response, openai_api.stream_chunk(completion, request_id, chunk.text, None, first))
                        first = False
                    if finish:
                        await _send(response, openai_api.stream_chunk(completion, request_id, None, finish))
                        if completion.include_usage:
                            await _send(response, openai_api.usage_chunk(completion, request_id, openai_api.usage(
                                chunk.usage.prompt_tokens, chunk.usage.completion_tokens)))
            except ServiceError as err:
                if not response.prepared:
                    raise self._api_error(err, completion.model) from None
                await _send(response, self._api_error(err, completion.model).body())
        if not response.prepared:
            await response.prepare(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _send(response: web.StreamResponse, payload: dict) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")


def _timeout(request: web.Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e9:
        raise bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds, got {raw!r}")
    return seconds
