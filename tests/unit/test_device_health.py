"""Device health: a worker whose thread died (a bug) or that stalls is reported, health follows,
a dead worker makes the neuron exit after the grace period; cortex marks models on an unhealthy
device UNAVAILABLE and publishes per-model health."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from grpc_health.v1 import health, health_pb2

from common.errors import Unavailable
from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.model_health import ModelHealth
from cortex.models import LoadSpec, Model, ModelTable, Rank
from cortex.placement import Placer
from cortex.registry import Registry
from neuron.device import DeviceSpec
from neuron.health import DeviceWatch, device_error
from neuron.worker import CallJob, DeviceWorker


class _Bug(BaseException):
    """Escapes every `except Exception`: stands for a bug that ends the device thread."""


def _dead_worker() -> DeviceWorker:
    worker = DeviceWorker(DeviceSpec("cpu", "cpu", 0), 1 << 30)
    worker.start()

    def crash(backend):
        raise _Bug("simulated bug in the device thread")
    worker.submit(CallJob(crash))
    worker._thread.join(10)
    assert not worker.alive
    return worker


def test_a_dead_worker_says_why_and_refuses_with_unavailable():
    worker = _dead_worker()
    assert "simulated bug" in device_error(worker, stall_seconds=60)
    with pytest.raises(Unavailable, match="simulated bug"):
        worker.submit(CallJob(lambda backend: None)).result(1)


class _Watched:
    def __init__(self, worker):
        self.serving: list[bool] = []
        self.exits = 0

        async def set_serving(value):
            self.serving.append(value)

        def exit_now():
            self.exits += 1
        self.watch = DeviceWatch([worker], set_serving, lambda: False, exit_now, stall_seconds=60, exit_after=5)


def test_a_dead_worker_turns_health_not_serving_then_exits_after_the_grace():
    watched = _Watched(_dead_worker())
    now = time.monotonic()
    asyncio.run(watched.watch.check(now))
    assert watched.serving == [False] and watched.exits == 0
    asyncio.run(watched.watch.check(now + 4))
    assert watched.exits == 0
    asyncio.run(watched.watch.check(now + 5.5))
    assert watched.exits == 1


def test_a_stalled_worker_is_reported_and_recovers():
    worker = SimpleNamespace(spec=SimpleNamespace(id="cpu"), alive=True, failure="", progress_at=0.0,
                             holds_work=lambda: True)
    watched = _Watched(worker)
    asyncio.run(watched.watch.check(100.0))
    assert watched.serving == [False] and "stalled" in watched.watch.errors["cpu"] and watched.exits == 0
    worker.progress_at = 99.0
    asyncio.run(watched.watch.check(100.0))
    assert watched.serving == [False, True] and not watched.watch.errors
    worker.holds_work = lambda: False  # idle for long is not a stall
    worker.progress_at = 0.0
    assert device_error(worker, 60, now=1000.0) == ""


def test_cortex_marks_a_model_on_an_unhealthy_device_unavailable_and_publishes_model_health():
    async def scenario():
        registry = Registry(["127.0.0.1:1"])
        node = registry.get("127.0.0.1:1")
        node.up, node.described_at = True, time.monotonic()
        shard = npb.ShardSummary(handle=7, model="m")
        node.devices = [npb.Device(id="cpu", shards=[shard])]
        table = ModelTable(registry, Placer())
        model = Model(LoadSpec("m", "p", "", 1, 0, 0, "", ""), state=cpb.MODEL_STATE_READY)
        model.ranks = [Rank(0, node.address, "cpu", handle=7)]
        table._models["m"] = model
        servicer = health.aio.HealthServicer()
        published = ModelHealth(servicer)

        async def status():
            request = health_pb2.HealthCheckRequest(service="model/m")
            return (await servicer.Check(request, SimpleNamespace())).status

        assert table.states() == {"m": cpb.MODEL_STATE_READY}
        await published.publish(table.states())
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        node.devices = [npb.Device(id="cpu", shards=[shard], error="device thread died: bug")]
        state, reason = table.state_of(model)
        assert state == cpb.MODEL_STATE_UNAVAILABLE and "device thread died" in reason
        await published.publish(table.states())
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        del table._models["m"]
        await published.publish(table.states())
        assert await status() == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        await registry.close()
    asyncio.run(scenario())
