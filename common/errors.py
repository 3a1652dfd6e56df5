"""Errors that carry a gRPC status code, and the wrapper that turns them into statuses.

Code that knows what went wrong raises a ServiceError subclass with a message that says what was
wrong and what to do; the RPC layer turns it into the matching status. Anything else is a bug and
becomes INTERNAL (and is logged with its traceback).
"""
from __future__ import annotations

import functools
import inspect

import grpc
import structlog

log = structlog.get_logger(__name__)


ECHO_CHARS = 200           # how much of a client's input a message may quote
MESSAGE_CHARS = 4096       # a whole status message: well under gRPC's trailer limits


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out: messages quote what the
    client sent without echoing a 64 KB path back into the trailers."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


def status_error(code: grpc.StatusCode, message: str) -> ServiceError:
    """A ServiceError carrying a status received from downstream, code unchanged."""
    error = ServiceError(clip(message, MESSAGE_CHARS))
    error.code = code
    return error


def from_rpc_error(err: grpc.RpcError, prefix: str = "") -> ServiceError:
    """Re-raise a downstream status with the same code, the message prefixed (e.g. the node)."""
    return status_error(err.code(), f"{prefix}{err.details()}")


STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # number on the wire -> StatusCode


def status_of(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status an error ends a call with; anything not a ServiceError is a bug, logged here."""
    if isinstance(err, ServiceError):
        # Capped: a status message travels in the trailers, and trailers past gRPC's metadata limit
        # reach the client as RESOURCE_EXHAUSTED instead of the real code.
        return err.code, clip(err.message, MESSAGE_CHARS)
    log.error("internal error", method=method, exc_info=err)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {clip(repr(err), 1000)} (a bug: please report it)"


async def _abort(context, err: Exception, method: str):
    await context.abort(*status_of(err, method))


def rpc_method(fn):
    """Decorate an async servicer method (unary or server-streaming) to map errors to statuses."""
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def stream(self, request, context):
            try:
                async for item in fn(self, request, context):
                    yield item
            except (grpc.aio.AbortError, GeneratorExit):
                raise
            except Exception as err:  # noqa: BLE001 - mapped to a status
                await _abort(context, err, name)
        return stream

    @functools.wraps(fn)
    async def unary(self, request, context):
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # noqa: BLE001 - mapped to a status
            await _abort(context, err, name)
    return unary
