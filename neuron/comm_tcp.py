"""The CPU collectives engine: a star over TCP rooted at rank 0.

Rank 0's neuron opens a listener when it creates the group id; the id carries its address and a
random group secret, like an NCCL unique id carries the root's bootstrap address. Reductions are
summed at the root in rank order and sent back, so every rank gets bit-identical results.

Joining is a mutual challenge: each side proves it holds the group key (an HMAC of the group secret
under the cluster token) without sending it, so a listener that is not rank 0 learns nothing and a
stranger who connects is dropped. With TLS configured the sockets are TLS, with the neuron's own
certificate and CA, and rank 0's listener binds to the neuron's own host, not every interface.
"""
from __future__ import annotations

import hashlib
import hmac
import queue
import secrets
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from .collectives import UNIQUE_ID_BYTES, CollectiveError, Communicator

_PREFIX = b"tcp1 "
# token -> (rank 0's listening socket, when it opened), until the group forms or the id expires
_listeners: dict[str, tuple[socket.socket, float]] = {}
LISTENER_TTL_SECONDS = 300.0  # a group id nobody joined with is closed after this
MAX_PENDING_GROUP_IDS = 16    # open group ids per process; beyond, CreateGroupId is refused
_lock = threading.Lock()


HANDSHAKE_SECONDS = 5.0  # a connecting peer gets this long to prove itself
HANDSHAKE_BYTES = 256    # the longest handshake message
ACCEPT_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Rendezvous:
    """What ranks need to trust each other: the cluster token (mixed into the group key) and, with
    TLS, the contexts for rank 0's side and for the other ranks' side."""
    cluster_token: str = ""
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None

    def key(self, group_secret: str) -> bytes:
        return hmac.new(self.cluster_token.encode(), group_secret.encode(), hashlib.sha256).digest()


OPEN_RENDEZVOUS = Rendezvous()


def _proof(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).hexdigest().encode()


class TooManyGroupIds(RuntimeError):
    """MAX_PENDING_GROUP_IDS group ids are open and none has expired yet."""


def _expire_listeners(now: float) -> None:
    for token, (listener, opened) in list(_listeners.items()):
        if now - opened > LISTENER_TTL_SECONDS:
            del _listeners[token]
            listener.close()


def create_group_id(advertise_host: str, bind_host: str = "") -> bytes:
    """bind_host: the interface rank 0 listens on (default: the advertised host's address)."""
    token = secrets.token_hex(16)
    # The longest port has 5 digits: check the length before opening anything.
    if len(_PREFIX + f"{advertise_host}:65535/{token}".encode()) > UNIQUE_ID_BYTES:
        raise ValueError(f"advertised host {advertise_host!r} is too long for a group id")
    with _lock:
        _expire_listeners(time.monotonic())
        if len(_listeners) >= MAX_PENDING_GROUP_IDS:
            raise TooManyGroupIds(f"{len(_listeners)} group ids are open and not joined yet; they close "
                                  f"{LISTENER_TTL_SECONDS:g} s after creation")
        listener = socket.create_server((bind_host or advertise_host, 0), backlog=64)
        _listeners[token] = (listener, time.monotonic())
    uid = _PREFIX + f"{advertise_host}:{listener.getsockname()[1]}/{token}".encode()
    return uid.ljust(UNIQUE_ID_BYTES, b"\0")


def is_tcp_group_id(uid: bytes) -> bool:
    return uid.startswith(_PREFIX)


def check_group_id(uid: bytes) -> None:
    """Raise ValueError unless uid is a well-formed TCP group id (HOST:PORT/TOKEN)."""
    _parse(uid)


def _parse(uid: bytes) -> tuple[str, int, str]:
    try:
        address, token = uid[len(_PREFIX):].rstrip(b"\0").decode().rsplit("/", 1)
        host, port = address.rsplit(":", 1)
        port_number = int(port)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("the group id is malformed: it is not HOST:PORT/TOKEN from CreateGroupId") from None
    if not host or not 0 < port_number < 65536 or not token:
        raise ValueError("the group id is malformed: it is not HOST:PORT/TOKEN from CreateGroupId")
    return host, port_number, token


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket, max_bytes: int | None = None) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if max_bytes is not None and n > max_bytes:
        raise ValueError(f"a {n}-byte message where at most {max_bytes} were expected")
    return _recv_exact(sock, n)


class TcpCommunicator(Communicator):
    def __init__(self, uid: bytes, rank: int, size: int, join_timeout: float, step_timeout: float,
                 rendezvous: Rendezvous = OPEN_RENDEZVOUS):
        self.rank, self.size, self.step_timeout = rank, size, step_timeout
        self.rendezvous = rendezvous
        self._peers: dict[int, socket.socket] = {}  # rank 0: every other rank; others: {0: root}
        host, port, token = _parse(uid)
        self._key = rendezvous.key(token)
        deadline = time.monotonic() + join_timeout
        if rank == 0:
            self._accept_all(token, deadline)
        else:
            self._connect(host, port, deadline)
        for sock in self._peers.values():
            sock.settimeout(step_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _accept_all(self, token: str, deadline: float) -> None:
        with _lock:
            listener, _ = _listeners.pop(token, (None, 0.0))
        if listener is None:
            raise CollectiveError("rank 0 must join on the neuron that created the group id")
        # Each connection proves itself on its own thread, so a stranger that connects and stays
        # silent delays nobody.
        admitted: queue.Queue = queue.Queue()
        try:
            while len(self._peers) < self.size - 1:
                while not admitted.empty():
                    sock, rank = admitted.get()
                    if rank is None or rank in self._peers:
                        sock.close()  # a stranger, a wrong key or a duplicate
                    else:
                        self._peers[rank] = sock
                if len(self._peers) == self.size - 1:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(1, self.size)) - set(self._peers))
                    raise CollectiveError(f"rank(s) {missing} did not join before the deadline")
                listener.settimeout(min(left, ACCEPT_POLL_SECONDS))
                try:
                    sock, _ = listener.accept()
                except socket.timeout:
                    continue
                sock.settimeout(min(HANDSHAKE_SECONDS, max(left, 0.001)))
                threading.Thread(target=self._admit_into, args=(sock, admitted), daemon=True,
                                 name="tcp-group-handshake").start()
        except BaseException:
            for sock in self._peers.values():
                sock.close()
            raise
        finally:
            listener.close()

    def _admit_into(self, sock: socket.socket, admitted: queue.Queue) -> None:
        try:
            admitted.put(self._admit(sock))
        except (OSError, ValueError, ConnectionError):  # ssl.SSLError is an OSError
            admitted.put((sock, None))

    def _admit(self, sock: socket.socket) -> tuple[socket.socket, int | None]:
        """Rank 0's side of the challenge: the peer's rank once it proved the group key, else None."""
        if self.rendezvous.server_ssl is not None:
            sock = self.rendezvous.server_ssl.wrap_socket(sock, server_side=True)
        hello = _recv(sock, HANDSHAKE_BYTES).split()
        if len(hello) != 3 or hello[0] != b"join" or not hello[1].isdigit():
            return sock, None
        rank, peer_nonce = int(hello[1]), hello[2]
        if not 0 < rank < self.size or rank in self._peers:
            return sock, None
        nonce = secrets.token_hex(16).encode()
        _send(sock, nonce + b" " + _proof(self._key, b"root", peer_nonce, nonce))
        answer = _recv(sock, HANDSHAKE_BYTES)
        if not hmac.compare_digest(answer, _proof(self._key, b"rank", str(rank).encode(), nonce, peer_nonce)):
            return sock, None
        _send(sock, b"ok")
        return sock, rank

    def _connect(self, host: str, port: int, deadline: float) -> None:
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001))
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise CollectiveError(f"could not reach rank 0 at {host}:{port} before the deadline: {err}") from None
                time.sleep(0.05)
                continue
            try:
                self._peers[0] = self._prove(sock, host)
                return
            except ssl.SSLError as err:
                sock.close()
                raise CollectiveError(f"TLS with rank 0 at {host}:{port} failed: {err.reason or err}; the neurons "
                                      "need certificates of the same CA, naming their advertised hosts") from None
            except (OSError, ConnectionError, ValueError) as err:
                sock.close()
                raise CollectiveError(f"rank 0 at {host}:{port} refused rank {self.rank}: {err}; all ranks need the "
                                      "same --cluster-token-file and TLS settings") from None

    def _prove(self, sock: socket.socket, host: str) -> socket.socket:
        """A rank's side of the challenge: rank 0 proves the key first, then we do."""
        if self.rendezvous.client_ssl is not None:
            sock = self.rendezvous.client_ssl.wrap_socket(sock, server_hostname=host)
        nonce = secrets.token_hex(16).encode()
        _send(sock, b"join %d %s" % (self.rank, nonce))
        root_nonce, _, root_proof = _recv(sock, HANDSHAKE_BYTES).partition(b" ")
        if not hmac.compare_digest(root_proof, _proof(self._key, b"root", nonce, root_nonce)):
            raise ValueError("the listener did not prove the group key (not this group's rank 0, or another "
                             "cluster token)")
        _send(sock, _proof(self._key, b"rank", str(self.rank).encode(), root_nonce, nonce))
        if _recv(sock, HANDSHAKE_BYTES) != b"ok":
            raise ValueError("rank 0 did not accept this rank's proof")
        return sock

    def _guard(self, fn):
        try:
            return fn()
        except socket.timeout:
            self.abort()
            raise CollectiveError(f"a collective on rank {self.rank} passed its {self.step_timeout:g} s deadline") from None
        except (OSError, ConnectionError) as err:
            self.abort()
            raise CollectiveError(f"a peer of rank {self.rank} went away: {err}") from None

    def all_reduce(self, x):
        def run():
            if self.rank == 0:
                total = np.array(x, copy=True)
                for r in range(1, self.size):
                    total += np.frombuffer(_recv(self._peers[r]), dtype=x.dtype).reshape(x.shape)
                payload = total.tobytes()
                for r in range(1, self.size):
                    _send(self._peers[r], payload)
                return total
            _send(self._peers[0], np.ascontiguousarray(x).tobytes())
            return np.frombuffer(_recv(self._peers[0]), dtype=x.dtype).reshape(x.shape).copy()
        return self._guard(run)

    def broadcast(self, x, root: int = 0):
        if root != 0:
            raise NotImplementedError("the TCP engine broadcasts from rank 0 only")

        def run():
            if self.rank == 0:
                for r in range(1, self.size):
                    _send(self._peers[r], np.ascontiguousarray(x).tobytes())
                return x
            return np.frombuffer(_recv(self._peers[0]), dtype=x.dtype).reshape(x.shape).copy()
        return self._guard(run)

    def all_gather(self, x):
        def run():
            if self.rank == 0:
                parts = [np.ascontiguousarray(x)] + [
                    np.frombuffer(_recv(self._peers[r]), dtype=x.dtype).reshape(x.shape) for r in range(1, self.size)]
                gathered = np.stack(parts)
                for r in range(1, self.size):
                    _send(self._peers[r], gathered.tobytes())
                return gathered
            _send(self._peers[0], np.ascontiguousarray(x).tobytes())
            return np.frombuffer(_recv(self._peers[0]), dtype=x.dtype).reshape((self.size, *x.shape)).copy()
        return self._guard(run)

    def barrier(self) -> None:
        self.all_reduce(np.zeros(1, dtype=np.float32))

    def abort(self) -> None:
        for sock in self._peers.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._peers.clear()
