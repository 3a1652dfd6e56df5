"""Call any method of a server by name, built from the generated descriptors, with or without
credentials: for the tests that walk every RPC of cortex and neuron (auth, TLS)."""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory

import common.proto.cortex.v1.cortex_pb2  # noqa: F401 - registers the descriptors
import common.proto.neuron.v1.neuron_pb2  # noqa: F401


def methods_of(service: str) -> list[str]:
    return [m.name for m in descriptor_pool.Default().FindServiceByName(service).methods]


def call(channel: grpc.Channel, service: str, method: str, body: dict | None = None, metadata=(),
         timeout: float = 30.0):
    """The method's answer (a list for a server stream); raises grpc.RpcError."""
    descriptor = descriptor_pool.Default().FindServiceByName(service).methods_by_name[method]
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    request = json_format.ParseDict(body or {}, request_class())
    path = f"/{service}/{method}"
    codec = dict(request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
    kwargs = dict(timeout=timeout, metadata=tuple(metadata))
    if descriptor.client_streaming:
        make = channel.stream_stream if descriptor.server_streaming else channel.stream_unary
        answer = make(path, **codec)(iter([request]), **kwargs)
    elif descriptor.server_streaming:
        answer = channel.unary_stream(path, **codec)(request, **kwargs)
    else:
        return channel.unary_unary(path, **codec)(request, **kwargs)
    return list(answer) if descriptor.server_streaming else answer


def code_of(channel, service: str, method: str, body: dict | None = None, metadata=()) -> grpc.StatusCode:
    try:
        call(channel, service, method, body, metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK
