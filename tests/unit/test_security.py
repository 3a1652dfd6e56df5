"""API key files, tokens, the access policy of both servers, and the CPU collectives' authenticated
rendezvous (in-process, on loopback)."""
from __future__ import annotations

import socket
import threading

import grpc
import numpy as np
import pytest

from common.security.credentials import (CredentialsError, bearer, load_token, parse_api_keys)
from common.security.interceptor import Access, AuthInterceptor, Refusal
from cortex.server import ACCESS as CORTEX_ACCESS
from neuron import comm_tcp
from neuron.collectives import CollectiveError
from neuron.server import ACCESS as NEURON_ACCESS
from tests.helpers import make_secrets
from tests.security_calls import methods_of

ADMIN_KEY, USER_KEY = "a" * 32, "u" * 32


def test_api_key_file_with_comments_blank_lines_and_roles():
    ring = parse_api_keys(f"# operators\n{ADMIN_KEY} admin   # the on-call\n\n  {USER_KEY}\tuser\n")
    assert ring.role_of(ADMIN_KEY) == "admin" and ring.role_of(USER_KEY) == "user"
    assert ring.role_of("b" * 32) is None and ring.role_of("") is None and ring.role_of(ADMIN_KEY[:-1]) is None
    assert ring.roles() == {"admin": 1, "user": 1}


@pytest.mark.parametrize("text,why", [
    (f"{ADMIN_KEY} root", "role must be admin or user"),
    (f"{ADMIN_KEY}", "expected `KEY ROLE`"),
    (f"{ADMIN_KEY} admin extra", "expected `KEY ROLE`"),
    ("short admin", "shorter than"),
    (f"{ADMIN_KEY} admin\n{ADMIN_KEY} user", "listed twice"),
    ("# nothing\n\n", "lists no key"),
])
def test_bad_api_key_files_are_refused_with_the_line(text, why):
    with pytest.raises(CredentialsError) as err:
        parse_api_keys(text, "keys.txt")
    assert why in str(err.value)
    assert ADMIN_KEY not in str(err.value), "a key must not be echoed in an error"


def test_cluster_token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("  " + "t" * 40 + "\n")
    assert load_token(str(path)) == "t" * 40
    path.write_text("tooshort")
    with pytest.raises(CredentialsError):
        load_token(str(path))
    with pytest.raises(CredentialsError, match="cannot read"):
        load_token(str(tmp_path / "missing"))


def test_bearer_header_parsing():
    assert bearer((("authorization", "Bearer abc"),)) == "abc"
    assert bearer((("authorization", "bearer  abc "),)) == "abc"
    assert bearer((("authorization", "Basic abc"),)) == ""
    assert bearer(()) == "" and bearer(None) == ""


def test_cortex_policy_covers_every_rpc():
    rpcs = {f"/cortex.v1.Cortex/{m}": CORTEX_ACCESS.access(f"/cortex.v1.Cortex/{m}") for m in methods_of("cortex.v1.Cortex")}
    assert {m for m, a in rpcs.items() if a is Access.USER} == {
        "/cortex.v1.Cortex/Generate", "/cortex.v1.Cortex/Forward", "/cortex.v1.Cortex/ListModels"}
    assert {a for m, a in rpcs.items() if a is not Access.USER} == {Access.ADMIN}
    for m in methods_of("cortex.v1.Fleet"):
        assert CORTEX_ACCESS.access(f"/cortex.v1.Fleet/{m}") is Access.CLUSTER
    assert CORTEX_ACCESS.access("/cortex.v1.Cortex/SomethingNew") is Access.ADMIN  # new RPCs start closed
    for open_method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"):
        assert CORTEX_ACCESS.access(open_method) is Access.OPEN and NEURON_ACCESS.access(open_method) is Access.OPEN
    for m in methods_of("neuron.v1.Neuron"):
        assert NEURON_ACCESS.access(f"/neuron.v1.Neuron/{m}") is Access.CLUSTER


def test_interceptor_decisions():
    keys = parse_api_keys(f"{ADMIN_KEY} admin\n{USER_KEY} user\n")
    guard = AuthInterceptor(CORTEX_ACCESS, keys, cluster_token="c" * 32)

    def outcome(method, *metadata):
        try:
            return guard.check(method, metadata)
        except Refusal as refusal:
            return refusal.code

    unload, generate, register = "/cortex.v1.Cortex/UnloadModel", "/cortex.v1.Cortex/Generate", "/cortex.v1.Fleet/Register"
    assert outcome(unload) == grpc.StatusCode.UNAUTHENTICATED
    assert outcome(unload, ("authorization", f"Bearer {USER_KEY}")) == grpc.StatusCode.PERMISSION_DENIED
    assert outcome(unload, ("authorization", f"Bearer {ADMIN_KEY}")) == "admin"
    assert outcome(generate, ("authorization", f"Bearer {USER_KEY}")) == "user"
    assert outcome(register, ("authorization", f"Bearer {ADMIN_KEY}")) == grpc.StatusCode.UNAUTHENTICATED
    assert outcome(register, ("x-cluster-token", "c" * 32)) == "admin"
    assert outcome("/grpc.health.v1.Health/Check") == "admin"
    # Nothing configured: open (the server warns at start).
    assert AuthInterceptor(CORTEX_ACCESS).check(unload, ()) == "admin"


# ---------------------------------------------------------------- CPU collectives rendezvous

def form(uid: bytes, rendezvous: list[comm_tcp.Rendezvous], timeout: float = 3.0):
    """Join every rank on its own thread; returns (communicators or exceptions) by rank."""
    results: list = [None] * len(rendezvous)

    def join(rank):
        try:
            results[rank] = comm_tcp.TcpCommunicator(uid, rank, len(rendezvous), timeout, 5.0, rendezvous[rank])
        except Exception as err:  # noqa: BLE001 - reported to the test
            results[rank] = err

    threads = [threading.Thread(target=join, args=(r,)) for r in range(len(rendezvous))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    return results


def all_reduce(comms) -> list[np.ndarray]:
    out: list = [None] * len(comms)
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, comms[r].all_reduce(
        np.full(4, r + 1, dtype=np.float32)))) for r in range(len(comms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_ranks_with_the_cluster_token_form_a_group_and_rank0_listens_on_its_own_host():
    uid = comm_tcp.create_group_id("127.0.0.1")
    listener, _ = comm_tcp._listeners[comm_tcp._parse(uid)[2]]
    assert listener.getsockname()[0] == "127.0.0.1"
    token = comm_tcp.Rendezvous("k" * 32)
    comms = form(uid, [token, token, token])
    assert all(isinstance(c, comm_tcp.TcpCommunicator) for c in comms), comms
    assert all(list(r) == [6.0] * 4 for r in all_reduce(comms))
    for c in comms:
        c.abort()


def test_a_rank_without_the_cluster_token_is_refused():
    uid = comm_tcp.create_group_id("127.0.0.1")
    comms = form(uid, [comm_tcp.Rendezvous("k" * 32), comm_tcp.Rendezvous("other" * 8)], timeout=1.5)
    assert isinstance(comms[1], CollectiveError) and "cluster token" in str(comms[1])
    assert isinstance(comms[0], CollectiveError) and "did not join" in str(comms[0])


def test_strangers_on_the_listener_do_not_stop_the_group():
    uid = comm_tcp.create_group_id("127.0.0.1")
    host, port, _ = comm_tcp._parse(uid)
    strangers = []
    for junk in (b"", b"GET / HTTP/1.1\r\n\r\n", (1 << 40).to_bytes(8, "little")):
        s = socket.create_connection((host, port))
        s.sendall(junk)
        strangers.append(s)
    token = comm_tcp.Rendezvous("k" * 32)
    comms = form(uid, [token, token], timeout=8)
    for s in strangers:
        s.close()
    assert all(isinstance(c, comm_tcp.TcpCommunicator) for c in comms), comms
    for c in comms:
        c.abort()


def test_a_rank_reveals_nothing_to_a_listener_that_is_not_rank0():
    """InitGroup with a unique id pointing elsewhere: the rank sends a nonce, not the group secret,
    and gives up when the listener cannot prove the key."""
    fake = socket.create_server(("127.0.0.1", 0))
    secret = "s" * 32
    uid = comm_tcp._PREFIX + f"127.0.0.1:{fake.getsockname()[1]}/{secret}".encode()
    seen = []

    def serve():
        conn, _ = fake.accept()
        seen.append(comm_tcp._recv(conn))
        comm_tcp._send(conn, b"0" * 32 + b" " + b"f" * 64)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(CollectiveError, match="did not prove the group key"):
        comm_tcp.TcpCommunicator(uid.ljust(comm_tcp.UNIQUE_ID_BYTES, b"\0"), 1, 2, 3.0, 1.0, comm_tcp.Rendezvous())
    thread.join(5)
    fake.close()
    assert seen and secret.encode() not in seen[0]


def test_the_rendezvous_over_tls_and_a_plaintext_rank_refused():
    secrets = make_secrets()
    from common.security.tls import TlsFiles
    files = TlsFiles(secrets.path("ca.pem"), secrets.path("node.pem"), secrets.path("node-key.pem"))
    tls = comm_tcp.Rendezvous("k" * 32, files.ssl_server_context(True), files.ssl_client_context())
    uid = comm_tcp.create_group_id("127.0.0.1")
    comms = form(uid, [tls, tls])
    assert all(isinstance(c, comm_tcp.TcpCommunicator) for c in comms), comms
    assert [list(r) for r in all_reduce(comms)] == [[3.0] * 4] * 2
    for c in comms:
        c.abort()
    uid = comm_tcp.create_group_id("127.0.0.1")
    comms = form(uid, [tls, comm_tcp.Rendezvous("k" * 32)], timeout=1.5)
    assert isinstance(comms[1], CollectiveError) and isinstance(comms[0], CollectiveError)


def test_group_ids_nobody_joins_are_bounded_and_expire(monkeypatch):
    monkeypatch.setattr(comm_tcp, "_listeners", {})
    monkeypatch.setattr(comm_tcp, "MAX_PENDING_GROUP_IDS", 3)
    opened = [comm_tcp.create_group_id("127.0.0.1") for _ in range(3)]
    with pytest.raises(comm_tcp.TooManyGroupIds):
        comm_tcp.create_group_id("127.0.0.1")
    sockets = [listener for listener, _ in comm_tcp._listeners.values()]
    monkeypatch.setattr(comm_tcp, "LISTENER_TTL_SECONDS", 0.0)
    fresh = comm_tcp.create_group_id("127.0.0.1")  # the three expired ones are closed first
    assert list(comm_tcp._listeners) == [comm_tcp._parse(fresh)[2]] and len(opened) == 3
    assert all(s.fileno() == -1 for s in sockets)
    for listener, _ in comm_tcp._listeners.values():
        listener.close()


def test_every_outgoing_channel_comes_from_the_channel_factory():
    """A channel made elsewhere would skip TLS and the cluster token."""
    import re
    from tests.helpers import ROOT
    factory = ROOT / "common" / "rpc" / "channels.py"
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in ("cortex", "neuron", "common")
                 for path in (ROOT / package).rglob("*.py") if path != factory and "proto" not in path.parts
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\b(insecure_channel|secure_channel)\(", line)]
    assert not offenders, f"make channels with common.rpc.channels: {offenders}"


def test_http_routes_take_the_same_keys_and_roles():
    from cortex.http.auth import authorize_request
    from common.security.interceptor import Authenticator
    keys = parse_api_keys(f"{ADMIN_KEY} admin\n{USER_KEY} user\n")
    auth = Authenticator(keys)

    def outcome(path, key=None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            return authorize_request(auth, "POST", path, headers)
        except Refusal as refusal:
            return refusal.code

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/org/name"):
        assert outcome(path) == grpc.StatusCode.UNAUTHENTICATED
        assert outcome(path, "w" * 32) == grpc.StatusCode.UNAUTHENTICATED
        assert outcome(path, USER_KEY) == "user" and outcome(path, ADMIN_KEY) == "admin"
    assert outcome("/health") == "admin" and outcome("/metrics") == "admin"  # open
    assert outcome("/v1/admin/anything", USER_KEY) == grpc.StatusCode.PERMISSION_DENIED
