"""API keys on the HTTP front: the same keys, roles and decisions as the gRPC API
(common.security.interceptor.Authenticator), read from `Authorization: Bearer KEY`.

/health and /metrics stay open (probes and scrapers, like gRPC health); the OpenAI routes need a
user or admin key; any other path needs an admin key, so a route added later starts closed."""
from __future__ import annotations

from common.security.credentials import bearer
from common.security.interceptor import Access, Authenticator

OPEN_PATHS = ("/health", "/metrics")
USER_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def http_access(path: str) -> Access:
    if path in OPEN_PATHS:
        return Access.OPEN
    if path in USER_PATHS or path.startswith("/v1/models/"):
        return Access.USER
    return Access.ADMIN


def authorize_request(authenticator: Authenticator, method: str, path: str, headers) -> str:
    """The caller's role, or common.security.interceptor.Refusal (UNAUTHENTICATED -> 401,
    PERMISSION_DENIED -> 403)."""
    key = bearer((("authorization", headers.get("Authorization", "")),))
    return authenticator.authorize(f"{method} {path}", http_access(path), api_key=key,
                                   user_may=", ".join(USER_PATHS))
