"""A server interceptor that answers an undecodable request with INVALID_ARGUMENT.

gRPC reports a request its deserializer cannot parse as UNKNOWN ("Unexpected DecodeError"), which
reads like a server bug. The guard wraps every method's deserializer: bytes that do not parse
become a marker, and the method's handler, wrapped too, aborts with INVALID_ARGUMENT naming the
message type instead of running."""
from __future__ import annotations

import inspect

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _guard_deserializer(deserialize):
    def guarded(data: bytes):
        try:
            return deserialize(data)
        except (DecodeError, ValueError, TypeError) as err:
            return _Undecodable(err)
    return guarded


async def _refuse(context, method: str, marker: _Undecodable):
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request to {method} is not a valid protobuf message of its type "
                        f"({str(marker.error)[:200]}); check the client's .proto files")


def _wrap_stream_in(behavior, method: str):
    async def stream_in(request_iterator, context):
        async def checked():
            async for item in request_iterator:
                if isinstance(item, _Undecodable):
                    await _refuse(context, method, item)
                yield item
        async for item in behavior(checked(), context):
            yield item
    return stream_in


def _wrap_stream_out(behavior, method: str):
    async def stream_out(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        async for item in behavior(request, context):
            yield item
    return stream_out


def _wrap_unary(behavior, method: str):
    async def unary(request, context):
        if isinstance(request, _Undecodable):
            await _refuse(context, method, request)
        return await behavior(request, context)
    return unary


_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        attr, make = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, attr)
        if inspect.isasyncgenfunction(behavior):
            wrap = _wrap_stream_in if handler.request_streaming else _wrap_stream_out
        elif inspect.iscoroutinefunction(behavior) and not handler.request_streaming:
            wrap = _wrap_unary
        else:
            return handler  # sync or stream-unary handlers (none here): left alone
        return make(wrap(behavior, details.method),
                    request_deserializer=_guard_deserializer(handler.request_deserializer),
                    response_serializer=handler.response_serializer)
