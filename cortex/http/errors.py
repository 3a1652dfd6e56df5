"""HTTP errors in OpenAI's shape, and the HTTP status each gRPC status code maps to.

{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}: the official clients raise
their typed exceptions (BadRequestError, NotFoundError, RateLimitError, ...) from the status.
"""
from __future__ import annotations

import grpc
from aiohttp import web

from common.errors import ServiceError

# gRPC status -> (HTTP status, OpenAI error type). 401/403 are the auth check's (cortex/http/app.py).
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # see failed_model_error
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def from_service_error(err: ServiceError) -> ApiError:
    status, kind = STATUS.get(err.code, (500, "server_error"))
    if err.code == grpc.StatusCode.NOT_FOUND:
        return ApiError(status, err.message, kind, "model", "model_not_found")
    return ApiError(status, err.message, kind, None, err.code.name.lower())


def failed_model_error(err: ServiceError) -> ApiError:
    """The model failed (its shard or group is gone): the service cannot serve it until it is
    loaded again, so 503 rather than the 400 of other FAILED_PRECONDITIONs."""
    return ApiError(503, err.message, "service_unavailable_error", "model", "model_failed")


def internal_error(err: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {err!r} (a bug: please report it)", "server_error", None, "internal")
