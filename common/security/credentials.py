"""API keys (clients of cortex) and the cluster token (cortex and neurons among themselves).

A key file has one `KEY ROLE` per line, ROLE being `admin` or `user`; `#` starts a comment, blank
lines are skipped. A token file holds one token (surrounding whitespace ignored). Presented secrets
are compared in constant time, against every known key, so timing says nothing about which one
matched or how much of one did. Keys never appear in logs or error messages."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

ADMIN, USER = "admin", "user"
ROLES = (ADMIN, USER)
MIN_SECRET_CHARS = 16

AUTHORIZATION = "authorization"        # gRPC metadata (and HTTP header): "Bearer KEY"
CLUSTER_TOKEN = "x-cluster-token"       # gRPC metadata on cortex <-> neuron and neuron <-> neuron calls


class CredentialsError(ValueError):
    """A key or token file that cannot be used; the message says which line and why."""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise CredentialsError(f"cannot read the {what} {path!r}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"the {what} {path!r} is not UTF-8 text") from None


@dataclass(frozen=True)
class KeyRing:
    """The API keys cortex accepts, each with its role."""
    _entries: tuple[tuple[bytes, str], ...]

    def __len__(self) -> int:
        return len(self._entries)

    def role_of(self, presented: str) -> str | None:
        """The role of a presented key, or None for an unknown one."""
        probe, role = _digest(presented), None
        for digest, entry_role in self._entries:
            if hmac.compare_digest(probe, digest):
                role = entry_role
        return role

    def roles(self) -> dict[str, int]:
        counts = {r: 0 for r in ROLES}
        for _, role in self._entries:
            counts[role] += 1
        return counts


def parse_api_keys(text: str, source: str = "api keys") -> KeyRing:
    entries: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CredentialsError(f"{source} line {number}: expected `KEY ROLE` (ROLE admin or user), "
                                   f"got {len(parts)} field(s)")
        key, role = parts
        if role not in ROLES:
            raise CredentialsError(f"{source} line {number}: role must be admin or user, got {role!r}")
        if len(key) < MIN_SECRET_CHARS:
            raise CredentialsError(f"{source} line {number}: the key is shorter than {MIN_SECRET_CHARS} "
                                   "characters; use a random one (e.g. `openssl rand -hex 32`)")
        digest = _digest(key)
        if digest in seen:
            raise CredentialsError(f"{source} line {number}: the same key is listed twice")
        seen.add(digest)
        entries.append((digest, role))
    if not entries:
        raise CredentialsError(f"{source} lists no key: add lines `KEY ROLE`")
    return KeyRing(tuple(entries))


def load_api_keys(path: str) -> KeyRing:
    return parse_api_keys(_read_text(path, "API key file"), path)


def load_token(path: str) -> str:
    token = _read_text(path, "cluster token file").strip()
    if len(token) < MIN_SECRET_CHARS or any(c.isspace() for c in token):
        raise CredentialsError(f"the cluster token in {path!r} must be one word of at least {MIN_SECRET_CHARS} "
                               "characters (e.g. `openssl rand -hex 32 > FILE`)")
    return token


def same_secret(presented: str, expected: str) -> bool:
    return hmac.compare_digest(_digest(presented), _digest(expected))


def bearer(metadata, header: str = AUTHORIZATION) -> str:
    """The token of an `authorization: Bearer TOKEN` entry in gRPC metadata ("" if none)."""
    for key, value in metadata or ():
        if key == header and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def metadata_value(metadata, header: str) -> str:
    for key, value in metadata or ():
        if key == header and isinstance(value, str):
            return value.strip()
    return ""
