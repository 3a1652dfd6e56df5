"""The CPU collectives engine: a star over TCP rooted at rank 0.

Rank 0's neuron opens a listener when it creates the group id (a bounded number, expiring); the id carries its address and a
random token, like an NCCL unique id carries the root's bootstrap address. Reductions are summed at
the root in rank order and sent back, so every rank gets bit-identical results.
"""
from __future__ import annotations

import secrets
import socket
import struct
import threading
import time

import numpy as np

from .collectives import UNIQUE_ID_BYTES, CollectiveError, Communicator

_PREFIX = b"tcp1 "
# token -> (rank 0's listening socket, when it was opened), until the group forms. Bounded: ids
# that no InitGroup claimed expire, and past MAX_PENDING_IDS the oldest listener is closed, so
# CreateGroupId calls cannot pile up sockets.
_listeners: dict[str, tuple[socket.socket, float]] = {}
_lock = threading.Lock()
MAX_PENDING_IDS = 16
PENDING_ID_SECONDS = 300.0


def create_group_id(advertise_host: str, bind_host: str = "0.0.0.0") -> bytes:
    """A group id naming a listener on `bind_host` (the neuron's own address when it has one)."""
    if len(_PREFIX) + len(f"{advertise_host}:65535/") + 32 > UNIQUE_ID_BYTES:
        raise ValueError(f"advertised host {advertise_host!r} is too long for a group id")
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    listener = socket.create_server((bind_host, 0), family=family, backlog=64)
    token = secrets.token_hex(16)
    with _lock:
        _expire(time.monotonic())
        _listeners[token] = (listener, time.monotonic())
    uid = _PREFIX + f"{advertise_host}:{listener.getsockname()[1]}/{token}".encode()
    return uid.ljust(UNIQUE_ID_BYTES, b"\0")


def _expire(now: float) -> None:
    """Close listeners past their time, and the oldest beyond the cap (caller holds _lock)."""
    by_age = sorted(_listeners.items(), key=lambda item: item[1][1])
    for i, (token, (listener, opened)) in enumerate(by_age):
        if now - opened > PENDING_ID_SECONDS or len(by_age) - i >= MAX_PENDING_IDS:
            listener.close()
            del _listeners[token]


def pending_ids() -> int:
    with _lock:
        return len(_listeners)


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


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


class TcpCommunicator(Communicator):
    def __init__(self, uid: bytes, rank: int, size: int, join_timeout: float, step_timeout: float):
        self.rank, self.size, self.step_timeout = rank, size, step_timeout
        self._peers: dict[int, socket.socket] = {}  # rank 0: every other rank; others: {0: root}
        host, port, token = _parse(uid)
        deadline = time.monotonic() + join_timeout
        if rank == 0:
            self._accept_all(token, deadline)
        else:
            self._connect(host, port, token, deadline)
        for sock in self._peers.values():
            sock.settimeout(step_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _accept_all(self, token: str, deadline: float) -> None:
        with _lock:
            listener, _ = _listeners.pop(token, (None, 0.0))
        if listener is None:
            raise CollectiveError("rank 0 must join on the neuron that created the group id (and within "
                                  f"{PENDING_ID_SECONDS:g} s of creating it)")
        try:
            while len(self._peers) < self.size - 1:
                listener.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    sock, _ = listener.accept()
                except socket.timeout:
                    missing = sorted(set(range(1, self.size)) - set(self._peers))
                    raise CollectiveError(f"rank(s) {missing} did not join before the deadline") from None
                sock.settimeout(5)
                hello = _recv(sock).decode().split()
                if len(hello) != 2 or hello[0] != token or not hello[1].isdigit():
                    sock.close()
                    continue
                self._peers[int(hello[1])] = sock
        finally:
            listener.close()

    def _connect(self, host: str, port: int, token: str, deadline: float) -> None:
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.001))
                _send(sock, f"{token} {self.rank}".encode())
                self._peers[0] = sock
                return
            except OSError as err:
                if time.monotonic() >= deadline:
                    raise CollectiveError(f"could not reach rank 0 at {host}:{port} before the deadline: {err}") from None
                time.sleep(0.05)

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
