"""Stand-ins for the neurons behind cortex's pure logic: Node values as the registry caches them,
a neuron stub that answers Describe / DropShard from a script, and a clock the test moves."""
from __future__ import annotations

import grpc

from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.registry import Node

GiB = 1 << 30


def shard(handle: int, model: str = "m", tp_rank: int = 0, tp_size: int = 1, group_id: str = "", error: str = "",
          **fields) -> npb.ShardSummary:
    return npb.ShardSummary(handle=handle, model=model, tp_rank=tp_rank, tp_size=tp_size, group_id=group_id,
                            error=error, **fields)


def device(id: str, free_gib: float, kind: str = "cuda", shards=(), total_gib: float = 80) -> npb.Device:
    return npb.Device(id=id, kind=kind, free_bytes=int(free_gib * GiB), total_bytes=int(total_gib * GiB),
                      shards=list(shards))


def node(address: str, *devices: npb.Device, up: bool = True, source: str = "static",
         described_at: float | None = 1.0) -> Node:
    return Node(address, source, channel=None, stub=None, devices=list(devices), up=up,
                reason="" if up else "missed 3 health polls", described_at=described_at)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeChannel:
    async def close(self) -> None:
        pass


class FakeNeuron:
    """Describe answers with `devices` and `address` (what a neuron says it is), or raises `error`
    when set; records how it was called."""

    def __init__(self, *devices: npb.Device, address: str = ""):
        self.devices = list(devices)
        self.address = address
        self.error: grpc.aio.AioRpcError | None = None
        self.describe_calls: list[dict] = []
        self.dropped: list[int] = []

    async def Describe(self, request, timeout=None, wait_for_ready=None):
        self.describe_calls.append({"timeout": timeout, "wait_for_ready": wait_for_ready})
        if self.error is not None:
            raise self.error
        return npb.DescribeResponse(host="h", version="v", devices=self.devices, address=self.address)

    async def DropShard(self, request, timeout=None):
        self.dropped.append(request.handle)
        for d in self.devices:
            kept = [s for s in d.shards if s.handle != request.handle]
            del d.shards[:]
            d.shards.extend(kept)
        return npb.DropShardResponse(freed_bytes=1)


class FakeFleet:
    """connect() for a Registry: every address gets its FakeNeuron (made on first use)."""

    def __init__(self):
        self.neurons: dict[str, FakeNeuron] = {}

    def __call__(self, address: str):
        return FakeChannel(), self.neurons.setdefault(address, FakeNeuron(address=address))
