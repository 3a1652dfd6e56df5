"""The one place channels are made: cortex -> neuron, neuron -> cortex, neuron -> neuron, and the
CLI / Python client -> cortex. A `ChannelSecurity` says whether the channel is TLS (verifying the
server against a CA, presenting our certificate if we have one) and which metadata goes on every
call (the cluster token, an API key)."""
from __future__ import annotations

import collections
from dataclasses import dataclass

import grpc

from common.security.credentials import AUTHORIZATION, CLUSTER_TOKEN
from common.security.tls import TlsFiles
from common.server import CHANNEL_OPTIONS


@dataclass(frozen=True)
class ChannelSecurity:
    tls: TlsFiles | None = None                       # None: plaintext
    metadata: tuple[tuple[str, str], ...] = ()        # sent on every call

    @classmethod
    def for_client(cls, api_key: str = "", tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> "ChannelSecurity":
        """A client of cortex: an API key, TLS when a CA or a client certificate is given."""
        tls = TlsFiles(tls_ca, tls_cert, tls_key) if (tls_ca or tls_cert) else None
        return cls(tls, ((AUTHORIZATION, f"Bearer {api_key}"),) if api_key else ())

    @classmethod
    def for_peer(cls, tls: TlsFiles, cluster_token: str = "") -> "ChannelSecurity":
        """cortex and neurons among themselves: TLS when the process has a CA (presenting its own
        certificate), the cluster token on every call."""
        return cls(tls if tls.dials_tls else None, ((CLUSTER_TOKEN, cluster_token),) if cluster_token else ())


PLAINTEXT = ChannelSecurity()


def aio_channel(address: str, security: ChannelSecurity = PLAINTEXT, options=CHANNEL_OPTIONS) -> grpc.aio.Channel:
    interceptors = _aio_interceptors(security.metadata)
    if security.tls is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, security.tls.channel_credentials(), options=options,
                                   interceptors=interceptors)


def sync_channel(address: str, security: ChannelSecurity = PLAINTEXT, options=CHANNEL_OPTIONS) -> grpc.Channel:
    if security.tls is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, security.tls.channel_credentials(), options=options)
    return grpc.intercept_channel(channel, _SyncMetadata(security.metadata)) if security.metadata else channel


def _merged(metadata, extra) -> tuple:
    return (*(metadata or ()), *extra)


class _AioMetadata:
    """Adds the metadata; grpc.aio files an interceptor under its first matching kind only, so
    each kind gets its own subclass below."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*_merged(d.metadata, self.metadata)),
                                          d.credentials, d.wait_for_ready)


class _AioUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list | None:
    if not metadata:
        return None
    return [kind(metadata) for kind in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)]


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, d) -> _Details:
        return _Details(d.method, d.timeout, _merged(d.metadata, self.metadata), d.credentials,
                        getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
