"""TLS from PEM files: gRPC server and channel credentials, and ssl contexts for the raw sockets of
the CPU collectives engine, all built from the same three files."""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsConfigError(ValueError):
    """A TLS setting that cannot work (a missing file, a key without a certificate, ...)."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise TlsConfigError(f"cannot read the {what} {path!r}: {err.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """ca: the PEM bundle that signs the peers' certificates (turns TLS on for outgoing calls);
    cert/key: this process's certificate chain and private key (what it presents)."""
    ca: str = ""
    cert: str = ""
    key: str = ""

    def __post_init__(self):
        if bool(self.cert) != bool(self.key):
            raise TlsConfigError("give --tls-cert and --tls-key together (a certificate and its private key)")

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca)

    def _pair(self) -> tuple[bytes, bytes] | tuple[None, None]:
        if not self.cert:
            return None, None
        return _read(self.key, "TLS private key"), _read(self.cert, "TLS certificate")

    # ---------------------------------------------------------------- gRPC

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        if not self.cert:
            raise TlsConfigError("a TLS server needs --tls-cert and --tls-key")
        if require_client_cert and not self.ca:
            raise TlsConfigError("--tls-require-client-cert needs --tls-ca (the CA that signs client certificates)")
        key, cert = self._pair()
        ca = _read(self.ca, "TLS CA bundle") if self.ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert = self._pair()
        ca = _read(self.ca, "TLS CA bundle") if self.ca else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    # ---------------------------------------------------------------- raw sockets

    def ssl_server_context(self, require_client_cert: bool) -> ssl.SSLContext:
        self.server_credentials(require_client_cert)  # same checks, same messages
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.ca:
            context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL if self.ca else ssl.CERT_NONE
        return context

    def ssl_client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context
