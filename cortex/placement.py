"""Placement: how much memory a model needs per device, and which device(s) get it.

The need comes from a neuron's Inspect (config.json and safetensors headers; no weights are read):
weights per rank + kv_slots x KV bytes per slot + workspace. A device qualifies when it has room for
the weights, the workspace and at least one KV slot (the neuron then allocates as many of the
wanted slots as fit). Among qualifying devices the emptiest wins; for tensor parallelism, N devices
of one neuron are preferred (collectives stay on one host), else the N emptiest across neurons.

Free memory comes from the registry's cached Describe, minus what loads still in flight have
reserved, so two concurrent loads do not both count on the same free bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.proto.neuron.v1 import neuron_pb2 as npb
from common.errors import InvalidArgument, ResourceExhausted, Unavailable, from_rpc_error
from common.units import human_bytes

from .registry import Node

INSPECT_TIMEOUT_S = 30.0    # reads headers of every safetensors file: quick, but over a network mount


@dataclass(frozen=True)
class Estimate:
    """What one rank of the model needs, from Inspect on a device of `device_kind`."""
    path: str                 # resolved by the inspecting neuron
    architecture: str
    dtype: str
    max_context: int
    vocab_size: int
    weight_bytes: int         # per rank
    kv_bytes_per_slot: int    # per rank
    workspace_bytes: int
    kv_slots: int
    device_kind: str
    inspected: str            # the neuron's own account of the numbers

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.kv_slots * self.kv_bytes_per_slot + self.workspace_bytes

    @property
    def min_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes_per_slot + self.workspace_bytes

    def describe(self) -> str:
        return (f"{self.inspected}; need per device = weights {human_bytes(self.weight_bytes)} + {self.kv_slots} KV "
                f"slots x {human_bytes(self.kv_bytes_per_slot)} + workspace {human_bytes(self.workspace_bytes)} = "
                f"{human_bytes(self.need_bytes)} (at least {human_bytes(self.min_bytes)}, with one KV slot)")


@dataclass(frozen=True)
class Target:
    rank: int
    node: str
    device: str
    free_bytes: int

    @property
    def where(self) -> str:
        return f"{self.node} device {self.device}"


async def inspect(node: Node, device: npb.Device, path: str, dtype: str, max_context: int, tp: int,
                  kv_slots: int) -> Estimate:
    request = npb.InspectRequest(path=path, dtype=dtype, device=device.id, max_context=max_context, tp_size=tp)
    try:
        reply = await node.stub.Inspect(request, timeout=INSPECT_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, f"node {node.address}: inspecting {path}: ") from None
    return Estimate(path=reply.path, architecture=reply.architecture, dtype=reply.dtype,
                    max_context=reply.max_context, vocab_size=reply.vocab_size,
                    weight_bytes=reply.weight_bytes_per_rank, kv_bytes_per_slot=reply.kv_bytes_per_slot,
                    workspace_bytes=reply.workspace_bytes, kv_slots=kv_slots or default_slots(reply),
                    device_kind=device.kind, inspected=reply.estimate)


def default_slots(reply: npb.InspectResponse) -> int:
    """The KV slots the neuron allocates for kv_slots 0, as it reports them; a neuron too old to
    report them counts as one (the least any load takes)."""
    return reply.default_kv_slots or 1


class Placer:
    def __init__(self):
        self._reserved: dict[tuple[str, str], int] = {}
        self._grouping: set[tuple[str, str]] = set()  # devices that a TP load in flight is putting in a group

    def free_bytes(self, node: Node, device: npb.Device) -> int:
        return max(0, device.free_bytes - self._reserved.get((node.address, device.id), 0))

    def in_group(self, node: Node, device: npb.Device) -> bool:
        """A neuron puts a device in one TP group at a time (two groups sharing devices could deadlock)."""
        return (node.address, device.id) in self._grouping or any(s.tp_size > 1 or s.error for s in device.shards)

    # ------------------------------------------------------------ choosing

    def candidates(self, nodes: list[Node], pin_node: str = "",
                   pin_device: str = "") -> list[tuple[int, Node, npb.Device]]:
        """(free bytes, node, device) of every device of an UP node that the pins allow, emptiest first."""
        found = [(self.free_bytes(n, d), n, d) for n in nodes if n.up and (not pin_node or n.address == pin_node)
                 for d in n.devices if not pin_device or d.id == pin_device]
        return sorted(found, key=lambda c: (-c[0], c[1].address, c[2].id))

    def place(self, nodes: list[Node], estimate: Estimate, tp: int, pin_node: str = "",
              pin_device: str = "") -> list[Target]:
        devices = [c for c in self.candidates(nodes, pin_node, pin_device) if c[2].kind == estimate.device_kind]
        if tp > 1:
            devices = [c for c in devices if not self.in_group(c[1], c[2])]
        fits = [c for c in devices if c[0] >= estimate.min_bytes]
        chosen = self._choose(fits, tp)
        if chosen is None:
            raise self._refusal(devices, fits, estimate, tp)
        return [Target(rank, node.address, device.id, free) for rank, (free, node, device) in enumerate(chosen)]

    @staticmethod
    def _choose(fits, tp: int):
        if len(fits) < tp:
            return None
        by_node: dict[str, list] = {}
        for c in fits:
            by_node.setdefault(c[1].address, []).append(c)
        # One neuron with tp devices: the one whose tp-th emptiest device is emptiest.
        local = [cs[:tp] for cs in by_node.values() if len(cs) >= tp]
        if local:
            return max(local, key=lambda cs: (cs[-1][0], sum(c[0] for c in cs)))
        # Across neurons: the tp emptiest devices, ranks of one neuron kept next to each other.
        picked = fits[:tp]
        order = list(dict.fromkeys(c[1].address for c in picked))
        return sorted(picked, key=lambda c: (order.index(c[1].address), -c[0]))

    @staticmethod
    def _refusal(devices, fits, estimate: Estimate, tp: int) -> ResourceExhausted:
        best = ", ".join(f"{n.address} device {d.id}: {human_bytes(free)}" for free, n, d in devices[:max(tp, 3)])
        what = "one device" if tp == 1 else f"each of {tp} devices (not already in a tensor-parallel group)"
        return ResourceExhausted(
            f"no room for the model: {what} needs {human_bytes(estimate.min_bytes)} free "
            f"({estimate.describe()}); {len(fits)} {estimate.device_kind} device(s) have that much; "
            f"emptiest devices: {best or 'none'}. Free memory (unload a model), load with a smaller dtype or "
            "max_context, or spread it over more tensor-parallel ranks")

    # ------------------------------------------------------------ reservations

    def reserve(self, targets: list[Target], nbytes: int) -> None:
        for t in targets:
            key = (t.node, t.device)
            self._reserved[key] = self._reserved.get(key, 0) + nbytes
            if len(targets) > 1:
                self._grouping.add(key)

    def release(self, targets: list[Target], nbytes: int) -> None:
        for t in targets:
            key = (t.node, t.device)
            if len(targets) > 1:
                self._grouping.discard(key)
            left = self._reserved.get(key, 0) - nbytes
            if left > 0:
                self._reserved[key] = left
            else:
                self._reserved.pop(key, None)


def check_pins(nodes: dict[str, Node], pin_node: str, pin_device: str, tp: int) -> None:
    """Reject pins that name nothing, before any work is done."""
    if pin_device and not pin_node:
        raise InvalidArgument("device is set but node is not: a device is pinned together with its node")
    if pin_device and tp > 1:
        raise InvalidArgument(f"device pins a single device, but tp is {tp}: pin only the node for tensor parallelism")
    if not pin_node:
        return
    node = nodes.get(pin_node)
    if node is None:
        known = ", ".join(nodes) or "none"
        raise InvalidArgument(f"node {pin_node!r} is not in the fleet (known nodes: {known})")
    if not node.up:
        raise Unavailable(f"node {pin_node} is down: {node.reason}")
    if pin_device and node.device(pin_device) is None:
        raise InvalidArgument(f"device {pin_device!r} is not on node {pin_node} "
                              f"(its devices: {', '.join(d.id for d in node.devices)})")
