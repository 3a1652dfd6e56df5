"""The fleet: every neuron cortex knows, whether it is up, and what its devices hold.

Neurons come from the static list (`--neuron`) and from self-registration (Fleet.Register, then
Fleet.Heartbeat). A poller calls every neuron's Describe each `poll_seconds` under a short deadline
and caches its devices, free memory and shards, so listing and placement never wait on the network.

A node is DOWN when it misses `MISSED_POLLS_DOWN` polls in a row, or, once it has sent heartbeats,
when none arrived for `heartbeat_timeout` seconds; the reason says which. It is UP again as soon as
it answers. Shards that could not be dropped while a node was unreachable are dropped when it is
back, so an unload or a failed load never leaks memory on a node that was briefly away.

A registered node that stays DOWN for `down_expiry` seconds is forgotten (a neuron that was
replaced or scaled away does not stay listed for ever); if it comes back it registers again.
Static nodes (`--neuron`) are never forgotten: the operator listed them.

Time comes from `clock` (monotonic seconds) and channels from `connect`, so the state changes can
be tested without a server or a wait.
"""
from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import structlog

from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from common.errors import FailedPrecondition, InvalidArgument, clip
from common.rpc.channels import PLAINTEXT, ChannelSecurity, aio_channel
from common.server import CHANNEL_OPTIONS

log = structlog.get_logger(__name__)

MISSED_POLLS_DOWN = 3
VERIFY_SECONDS = 5.0  # a registering neuron must answer Describe within this
DOWN_EXPIRY_SECONDS = 600.0  # default of `cortex serve --down-expiry-seconds`

# A restarted neuron should be found within a poll or two, not after gRPC's default reconnect
# backoff (which grows to two minutes while the node is away).
NEURON_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def check_address(address: str, field_name: str = "address") -> str:
    """HOST:PORT with a numeric port (IPv6 hosts in brackets). Returns it stripped."""
    address = address.strip()
    host, sep, port = address.rpartition(":")
    if not address or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"{field_name} {clip(address)!r} is not HOST:PORT (e.g. 10.0.0.5:50061)")
    return address


@dataclass(eq=False)
class InFlight:
    """A call cortex has open on a node; `cut` says why cortex ended it (the node went DOWN)."""
    call: object
    cut: str = ""


@dataclass
class Node:
    address: str
    source: str                      # "static" or "registered"
    channel: grpc.aio.Channel
    stub: neuron_pb2_grpc.NeuronStub
    host: str = ""
    version: str = ""
    devices: list[npb.Device] = field(default_factory=list)
    up: bool = False
    reason: str = "not reached yet"
    last_seen: float | None = None       # monotonic time of the last answer (poll or heartbeat)
    last_heartbeat: float | None = None  # None: this node does not heartbeat (static)
    described_at: float | None = None    # when the cached devices were asked for
    missed_polls: int = 0
    last_error: str = ""
    down_since: float | None = None      # when it was last seen going DOWN (or was added); None while UP
    pending_drops: set[int] = field(default_factory=set)
    inflight: set[InFlight] = field(default_factory=set)

    def handles(self) -> set[int]:
        return {s.handle for d in self.devices for s in d.shards}

    def shard(self, handle: int) -> npb.ShardSummary | None:
        return next((s for d in self.devices for s in d.shards if s.handle == handle), None)

    def device(self, device_id: str) -> npb.Device | None:
        return next((d for d in self.devices if d.id == device_id), None)


def connect_neuron(address: str, security: ChannelSecurity = PLAINTEXT
                   ) -> tuple[grpc.aio.Channel, neuron_pb2_grpc.NeuronStub]:
    channel = aio_channel(address, security, options=NEURON_CHANNEL_OPTIONS)
    return channel, neuron_pb2_grpc.NeuronStub(channel)


class Registry:
    def __init__(self, static: list[str] = (), poll_seconds: float = 2.0, heartbeat_timeout: float = 6.0,
                 down_expiry: float = DOWN_EXPIRY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 connect: Callable[[str], tuple] | None = None, channels: ChannelSecurity = PLAINTEXT):
        """channels: TLS and the cluster token for every call to a neuron (unless `connect` is given)."""
        self.poll_seconds = poll_seconds
        self.poll_timeout = min(poll_seconds, 1.0)  # Describe answers from cached figures: it is fast
        self.heartbeat_timeout = heartbeat_timeout
        self.down_expiry = down_expiry   # 0: never forget a registered node
        self.clock = clock
        self._connect = connect or functools.partial(connect_neuron, security=channels)
        self._nodes: dict[str, Node] = {}
        self._poller: asyncio.Task | None = None
        self.after_poll = None  # called after every poll round (the model table adopts orphans)
        for address in static:
            self._add(check_address(address, "--neuron"), "static")

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.poll_all()  # know the static fleet before the first request arrives
        self._poller = asyncio.create_task(self._poll_forever(), name="registry-poller")

    async def close(self) -> None:
        if self._poller:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*(n.channel.close() for n in self._nodes.values()), return_exceptions=True)

    # ------------------------------------------------------------ queries

    def nodes(self) -> list[Node]:
        return sorted(self._nodes.values(), key=lambda n: n.address)

    def get(self, address: str) -> Node | None:
        return self._nodes.get(address)

    def up_nodes(self) -> list[Node]:
        return [n for n in self.nodes() if n.up]

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_timeout / 3  # three chances before the node counts as down

    # ------------------------------------------------------------ Fleet RPCs

    async def register(self, address: str, host: str, version: str) -> Node:
        address = check_address(address)
        node = self._nodes.get(address)
        if node is None:
            verified = await self._verified(address)
            node = self._nodes.setdefault(address, verified)  # a concurrent Register may have won
            if node is not verified:
                await verified.channel.close()
        node.host, node.version = host or node.host, version or node.version
        node.last_heartbeat = self.clock()
        log.info("neuron registered", node=address, host=host, version=version, source=node.source)
        await self.poll(node)  # answer with a known state; the neuron is serving before it registers
        return node

    def heartbeat(self, address: str) -> bool:
        node = self._nodes.get(address)
        if node is None or node.last_heartbeat is None:
            return False  # unknown, or static and never registered: ask it to register
        node.last_heartbeat = node.last_seen = self.clock()
        self._evaluate(node)
        return True

    # ------------------------------------------------------------ polling

    async def poll_all(self) -> None:
        await asyncio.gather(*(self.poll(n) for n in list(self._nodes.values())))

    async def refresh(self, addresses) -> None:
        """Poll these nodes now (after a load or unload changed their memory)."""
        await asyncio.gather(*(self.poll(n) for a in set(addresses) if (n := self._nodes.get(a))))

    async def poll(self, node: Node) -> None:
        asked_at = self.clock()
        try:
            # wait_for_ready: a node that answered before and is reconnecting gets the whole deadline,
            # not a fast failure. A node that never answered fails fast instead, so that its reason
            # says why (connection refused, name not resolved) rather than DEADLINE_EXCEEDED.
            reply = await node.stub.Describe(npb.DescribeRequest(), timeout=self.poll_timeout,
                                             wait_for_ready=node.described_at is not None)
        except grpc.aio.AioRpcError as err:
            node.missed_polls += 1
            node.last_error = f"{err.code().name}: {err.details()}"
        except Exception as err:  # noqa: BLE001 - the poller must survive anything
            node.missed_polls += 1
            node.last_error = repr(err)
            log.exception("poll failed", node=node.address)
        else:
            node.devices = list(reply.devices)
            node.host, node.version = reply.host or node.host, reply.version or node.version
            node.described_at, node.last_seen, node.missed_polls, node.last_error = asked_at, self.clock(), 0, ""
            if node.pending_drops:
                await self._drop_pending(node)
        self._evaluate(node)

    async def _poll_forever(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_all()
                await self.expire()
                if self.after_poll is not None:
                    done = self.after_poll()
                    if asyncio.iscoroutine(done):
                        await done
            except Exception:  # noqa: BLE001 - keep polling whatever happened
                log.exception("poll round failed")
            await asyncio.sleep(max(0.0, self.poll_seconds - (time.monotonic() - started)))

    def _evaluate(self, node: Node) -> None:
        now = self.clock()
        if node.missed_polls >= MISSED_POLLS_DOWN:
            up, reason = False, (f"missed {node.missed_polls} health polls in a row "
                                 f"(every {self.poll_seconds:g}s); last error: {node.last_error}")
        elif node.last_heartbeat is not None and now - node.last_heartbeat > self.heartbeat_timeout:
            up, reason = False, (f"no heartbeat for {now - node.last_heartbeat:.1f}s "
                                 f"(timeout {self.heartbeat_timeout:g}s)")
        elif node.described_at is None:
            up, reason = False, f"not reached yet: {node.last_error or 'first poll pending'}"
        else:
            up, reason = True, ""
        if up != node.up:
            if up:
                log.info("node up", node=node.address, devices=[d.id for d in node.devices])
            else:
                log.warning("node down", node=node.address, reason=reason, calls_ended=len(node.inflight))
            node.down_since = None if up else now
        node.up, node.reason = up, reason
        if not up and node.inflight:
            self._cut_calls(node, reason)

    # ------------------------------------------------------------ calls in flight

    def track(self, address: str, call) -> InFlight:
        """Note a call open on this node, so that it ends as soon as the node is marked DOWN (a hung
        node would otherwise hold it until keepalive or the client's deadline gives up)."""
        entry = InFlight(call)
        node = self._nodes.get(address)
        if node is not None:
            node.inflight.add(entry)
        return entry

    def untrack(self, address: str, entry: InFlight) -> None:
        node = self._nodes.get(address)
        if node is not None:
            node.inflight.discard(entry)

    @staticmethod
    def _cut_calls(node: Node, reason: str) -> None:
        for entry in list(node.inflight):
            entry.cut = f"node {node.address} went down while serving this call ({reason}); retry"
            entry.call.cancel()
        node.inflight.clear()

    # ------------------------------------------------------------ deferred drops

    def schedule_drop(self, address: str, handle: int) -> None:
        """Drop this shard when the node answers again (it could not be dropped now)."""
        node = self._nodes.get(address)
        if node is not None:
            node.pending_drops.add(handle)
            log.warning("shard drop deferred until the node answers", node=address, handle=handle)

    async def _drop_pending(self, node: Node) -> None:
        present = node.handles()
        node.pending_drops &= present  # a restarted neuron already forgot the others
        for handle in list(node.pending_drops):
            try:
                await node.stub.DropShard(npb.DropShardRequest(handle=handle), timeout=10)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("deferred drop failed; will retry", node=node.address, handle=handle,
                                error=err.details())
                    continue
            node.pending_drops.discard(handle)
            log.info("deferred drop done", node=node.address, handle=handle)

    # ------------------------------------------------------------ internals

    def _add(self, address: str, source: str) -> Node:
        node = self._nodes[address] = self._node(address, source)
        return node

    def _node(self, address: str, source: str) -> Node:
        channel, stub = self._connect(address)
        return Node(address, source, channel, stub, down_since=self.clock())

    async def _verified(self, address: str) -> Node:
        """A node for a new registration, once the address has answered Describe as that neuron
        (over TLS and with the cluster token when configured). Nothing is kept for one that fails,
        so made-up registrations cost cortex nothing after the call."""
        node = self._node(address, "registered")
        try:
            reply = await node.stub.Describe(npb.DescribeRequest(), timeout=VERIFY_SECONDS, wait_for_ready=True)
        except grpc.aio.AioRpcError as err:
            await node.channel.close()
            raise FailedPrecondition(f"cannot verify the neuron at {address}: its Describe failed with "
                                     f"{err.code().name} ({err.details()}); --advertise must be an address cortex "
                                     "reaches, serving with this fleet's cluster token and TLS settings") from None
        if reply.address != address:
            await node.channel.close()
            raise FailedPrecondition(f"cannot verify the neuron at {address}: the server there says it is "
                                     f"{reply.address or 'no neuron'!r}; register with the neuron's --advertise address")
        return node
        return node

    async def expire(self) -> list[str]:
        """Forget the registered nodes that have been DOWN for down_expiry seconds. Returns their addresses."""
        if not self.down_expiry:
            return []
        now = self.clock()
        gone = [n for n in self._nodes.values() if n.source == "registered" and not n.up
                and n.down_since is not None and now - n.down_since >= self.down_expiry]
        for node in gone:
            del self._nodes[node.address]
            log.warning("registered node forgotten: down too long", node=node.address,
                        down_seconds=round(now - node.down_since, 1), expiry_seconds=self.down_expiry,
                        reason=node.reason)
        await asyncio.gather(*(n.channel.close() for n in gone), return_exceptions=True)
        return [n.address for n in gone]
