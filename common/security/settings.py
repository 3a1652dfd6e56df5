"""The security settings of both servers and what a server builds from them: its TLS server
credentials, its auth interceptor, the channels it opens to its peers, and the one warning an open
server logs at start."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import structlog

from common.config import ConfigError, Setting
from common.rpc.channels import ChannelSecurity

from .credentials import CredentialsError, KeyRing, load_api_keys, load_token
from .interceptor import AccessPolicy, Authenticator, AuthInterceptor
from .tls import TlsConfigError, TlsFiles

log = structlog.get_logger(__name__)


def cluster_settings(require_client_cert_default: bool) -> list[Setting]:
    """What cortex and every neuron take: the cluster token and TLS."""
    return [
        Setting("cluster_token_file", "", "file holding the cluster token: required on every neuron RPC and on "
                "cortex's Fleet service, sent on cortex's and the neurons' own calls; same file on every process"),
        Setting("tls_cert", "", "TLS certificate chain (PEM) this server presents, also as client certificate on "
                "its own calls to peers; with --tls-key"),
        Setting("tls_key", "", "private key (PEM) of --tls-cert"),
        Setting("tls_ca", "", "CA bundle (PEM) that signs the fleet's certificates: verifies peers, and turns on "
                "TLS for this process's calls to cortex and neurons"),
        Setting("tls_require_client_cert", require_client_cert_default,
                "with --tls-ca: accept only clients presenting a certificate signed by that CA (mutual TLS)",
                type=bool),
    ]


API_KEYS_SETTING = Setting("api_keys", "", "file of API keys for cortex's clients: lines `KEY ROLE`, ROLE admin "
                           "or user (Generate, Forward, ListModels only); empty: no key needed")


@dataclass(frozen=True)
class ServerSecurity:
    tls: TlsFiles
    require_client_cert: bool
    cluster_token: str = ""
    api_keys: KeyRing | None = None

    @classmethod
    def from_settings(cls, settings: dict) -> "ServerSecurity":
        """Reads the files now, so a bad one stops the process at start with the reason (ConfigError)."""
        try:
            tls = TlsFiles(settings["tls_ca"], settings["tls_cert"], settings["tls_key"])
            security = cls(tls, bool(settings["tls_require_client_cert"] and tls.ca),
                           load_token(settings["cluster_token_file"]) if settings["cluster_token_file"] else "",
                           load_api_keys(settings["api_keys"]) if settings.get("api_keys") else None)
            if tls.ca and not tls.cert:
                raise TlsConfigError("--tls-ca without --tls-cert/--tls-key: a server in a TLS fleet serves TLS too")
            security.server_credentials()  # reads the PEM files
            return security
        except (CredentialsError, TlsConfigError) as err:
            raise ConfigError(str(err)) from None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.server_credentials(self.require_client_cert) if self.tls.serves_tls else None

    def interceptor(self, policy: AccessPolicy) -> AuthInterceptor:
        return AuthInterceptor(policy, self.api_keys, self.cluster_token)

    def authenticator(self) -> Authenticator:
        """The same decisions for a front that is not gRPC (cortex's HTTP API)."""
        return Authenticator(self.api_keys, self.cluster_token)

    def https_context(self):
        """An ssl context for an HTTPS front with the server's certificate, or None without TLS."""
        return self.tls.ssl_server_context(self.require_client_cert) if self.tls.serves_tls else None

    def peer_channels(self) -> ChannelSecurity:
        return ChannelSecurity.for_peer(self.tls, self.cluster_token)

    def warn_if_open(self, component: str, takes_api_keys: bool) -> None:
        """One warning line naming what is unprotected, or an info line saying what is on."""
        gaps = []
        if takes_api_keys and self.api_keys is None:
            gaps.append("no --api-keys: any client can load, unload and generate")
        if not self.cluster_token:
            gaps.append("no --cluster-token-file: " + ("anyone can register a neuron" if takes_api_keys
                                                      else "anyone who reaches the port can load, drop and run shards"))
        if not self.tls.serves_tls:
            gaps.append("no --tls-cert: plaintext, credentials travel in the clear")
        if gaps:
            log.warning(f"{component} is OPEN: fine on one machine, not on a shared network (see docs/operations.md, "
                        "Securing a fleet)", gaps=gaps)
        else:
            log.info(f"{component} security on", tls=True, mutual_tls=self.require_client_cert,
                     cluster_token=True, **({"api_keys": self.api_keys.roles()} if takes_api_keys else {}))
