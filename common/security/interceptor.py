"""The server interceptor that authenticates every call before its handler runs.

Each method needs one of four kinds of access (an `AccessPolicy` says which):
- OPEN: health and reflection, so probes and `grpcurl list/describe` work without credentials;
- CLUSTER: the cluster token in `x-cluster-token` (cortex's Fleet service, every neuron RPC);
- USER / ADMIN: an API key in `authorization: Bearer KEY` whose role allows the call.
A credential that is not configured is not asked for (an open server, with a warning at start).
Missing or unknown credentials -> UNAUTHENTICATED; a known key with too small a role ->
PERMISSION_DENIED. The handler can ask `caller_role()` what the caller is allowed to see."""
from __future__ import annotations

import contextvars
import enum
import inspect
import time
from dataclasses import dataclass

import grpc
import structlog

from common.server import rewrap_handler

from .credentials import ADMIN, CLUSTER_TOKEN, USER, KeyRing, bearer, metadata_value, same_secret

log = structlog.get_logger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REFUSAL_LOG_SECONDS = 10.0  # refusals of one method and code are logged at most this often (with a count)

_caller_role: contextvars.ContextVar[str] = contextvars.ContextVar("caller_role", default=ADMIN)


def caller_role() -> str:
    """The role of the current call's API key: "admin" or "user" ("admin" when cortex takes no keys)."""
    return _caller_role.get()


class Access(enum.Enum):
    OPEN = "open"
    CLUSTER = "cluster"
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True)
class AccessPolicy:
    """Access by method: services whose every method needs the cluster token, methods a user key
    may call; every other method needs an admin key (so a method added later starts closed)."""
    cluster_services: tuple[str, ...] = ()
    user_methods: frozenset[str] = frozenset()

    def access(self, method: str) -> Access:
        if method.startswith(OPEN_PREFIXES):
            return Access.OPEN
        service = method.lstrip("/").split("/", 1)[0]
        if service in self.cluster_services:
            return Access.CLUSTER
        return Access.USER if method in self.user_methods else Access.ADMIN


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Authenticator:
    """Decides one call: its access kind and the credentials it presented -> the caller's role or
    Refusal. Shared by the gRPC interceptor and the HTTP front."""

    def __init__(self, api_keys: KeyRing | None = None, cluster_token: str = ""):
        self.api_keys, self.cluster_token = api_keys, cluster_token

    def authorize(self, what: str, access: Access, api_key: str = "", cluster_token: str = "",
                  user_may: str = "") -> str:
        """what: the call, for the message; api_key: the presented bearer token; user_may: what a
        user key may call instead (for PERMISSION_DENIED's message)."""
        if access is Access.OPEN:
            return ADMIN
        if access is Access.CLUSTER:
            if self.cluster_token and not same_secret(cluster_token, self.cluster_token):
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                              f"{what} is for cortex and the neurons of this fleet: send the cluster token "
                              f"(metadata `{CLUSTER_TOKEN}`, the content of --cluster-token-file)")
            return ADMIN
        if self.api_keys is None:
            return ADMIN
        role = self.api_keys.role_of(api_key) if api_key else None
        if role is None:
            presented = "an unknown API key" if api_key else "no API key"
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED,
                          f"{what}: {presented}; send `authorization: Bearer KEY` with a key of cortex's --api-keys "
                          "(CLI: --api-key or CORTEX_API_KEY)")
        if access is Access.ADMIN and role != ADMIN:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED,
                          f"{what} needs an admin API key" + (f"; a {USER} key may call {user_may}" if user_may else ""))
        return role


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, policy: AccessPolicy, api_keys: KeyRing | None = None, cluster_token: str = ""):
        self.policy = policy
        self.authenticator = Authenticator(api_keys, cluster_token)
        self._user_may = ", ".join(sorted(m.rsplit("/", 1)[-1] for m in policy.user_methods))
        self._refusals: dict[tuple[str, str], list] = {}  # (method, code) -> [last logged at, refused since]

    def check(self, method: str, metadata) -> str:
        """The caller's role, or Refusal."""
        return self.authenticator.authorize(method, self.policy.access(method), bearer(metadata),
                                            metadata_value(metadata, CLUSTER_TOKEN), self._user_may)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        try:
            role = self.check(details.method, details.invocation_metadata)
        except Refusal as refusal:
            self._log_refusal(details.method, refusal.code.name)
            return rewrap_handler(handler, lambda behavior, refusal=refusal: _refuse(behavior, refusal))
        if role == ADMIN:
            return handler  # the default role: nothing to set
        return rewrap_handler(handler, lambda behavior: _as_role(behavior, role))


    def _log_refusal(self, method: str, code: str) -> None:
        """One line per method and code every REFUSAL_LOG_SECONDS, so a flood of bad calls cannot
        flood the log. Never the presented credential."""
        now = time.monotonic()
        entry = self._refusals.setdefault((method, code), [float("-inf"), 0])
        entry[1] += 1
        if now - entry[0] >= REFUSAL_LOG_SECONDS:
            log.warning("calls refused", method=method, code=code, count=entry[1])
            entry[0], entry[1] = now, 0


def _refuse(behavior, refusal: Refusal):
    if inspect.isasyncgenfunction(behavior):
        async def refuse_stream(request, context):
            await context.abort(refusal.code, refusal.message)
            yield  # pragma: no cover - makes this an async generator
        return refuse_stream

    async def refuse(request, context):
        await context.abort(refusal.code, refusal.message)
    return refuse


def _as_role(behavior, role: str):
    """Run the handler with caller_role() == role (set inside the handler's own task)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            _caller_role.set(role)
            async for item in behavior(request, context):
                yield item
        return stream

    async def unary(request, context):
        _caller_role.set(role)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result
    return unary
