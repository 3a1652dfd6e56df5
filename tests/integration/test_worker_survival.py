"""A client that gives up must not take a device down: requests cancelled or past their deadline
while they wait for a KV slot leave the device serving, and health keeps telling the truth."""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from tests.helpers import MODELS, start_neuron

PROMPT = pb.Prompt(tokens=pb.TokenIds(ids=[1, 5, 9]))
HOLDER_TOKENS = 1000  # long enough that the holder still runs while the others wait and give up


@pytest.fixture(scope="module")
def neuron(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "long", LlamaShape(max_position_embeddings=8192))  # generates for seconds
    srv = start_neuron(model_roots=[MODELS, root])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def channel(neuron):
    ch = neuron.channel()
    yield ch
    ch.close()


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _generate(stub, handle, max_tokens, timeout):
    return stub.Generate(pb.GenerateRequest(handle=handle, prompt=PROMPT,
                                            sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                         timeout=timeout)


def test_requests_that_give_up_while_waiting_for_a_slot_leave_the_device_serving(channel):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    shard = list(stub.LoadShard(pb.LoadShardRequest(path="long", model="one-slot", max_seqs=1, max_context=8192)))
    handle = shard[-1].loaded.handle
    assert shard[-1].loaded.max_seqs == 1
    for _ in range(2):
        holder = _generate(stub, handle, 6000, timeout=120)
        next(holder)  # it holds the only KV slot until it is cancelled below
        # One waiter passes its deadline while it waits for the slot ...
        with pytest.raises(grpc.RpcError) as late:
            list(_generate(stub, handle, 4, timeout=0.05))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ... one is cancelled by its caller while it waits ...
        cancelled = _generate(stub, handle, 4, timeout=60)
        time.sleep(0.2)
        cancelled.cancel()
        time.sleep(0.2)
        # ... then the slot frees, and the device meets both given-up requests in its queue.
        holder.cancel()
    chunks = list(_generate(stub, handle, 3, timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert not stub.Describe(pb.DescribeRequest()).devices[0].error
    stub.DropShard(pb.DropShardRequest(handle=handle))


def test_requests_cancelled_or_expired_at_random_stages_leave_the_device_serving(channel):
    """Hundreds of requests, each given up at a random moment (queued for a slot, prefilling,
    decoding, just finished) by a deadline or a cancel; then the device still serves."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    stub = neuron_pb2_grpc.NeuronStub(channel)
    shard = list(stub.LoadShard(pb.LoadShardRequest(path="llama2", model="random-stages", max_seqs=2)))[-1].loaded
    rng = random.Random(1)
    plans = [(rng.choice(["deadline", "cancel", "finish"]), rng.uniform(0.001, 0.08), rng.randint(1, 60))
             for _ in range(300)]

    def one(plan):
        how, after, max_tokens = plan
        request = pb.GenerateRequest(handle=shard.handle, prompt=PROMPT,
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        call = stub.Generate(request, timeout=after if how == "deadline" else 30)
        if how == "cancel":
            threading.Timer(after, call.cancel).start()
        try:
            for _ in call:
                pass
            return "OK"
        except grpc.RpcError as err:
            return err.code().name

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, plans))
    assert set(codes) <= {"OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, set(codes)
    assert "OK" in codes and ("CANCELLED" in codes or "DEADLINE_EXCEEDED" in codes)
    chunks = list(stub.Generate(pb.GenerateRequest(handle=shard.handle, prompt=PROMPT,
                                                   sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)),
                                timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert not stub.Describe(pb.DescribeRequest()).devices[0].error
    stub.DropShard(pb.DropShardRequest(handle=shard.handle))


class _Bug(BaseException):
    """Escapes every `except Exception`: stands for a bug that ends a device thread."""


def test_a_neuron_whose_device_worker_died_says_so_and_exits_non_zero(monkeypatch, tmp_path):
    """The serving process's own wiring (in-process, a real gRPC server): health NOT_SERVING,
    Describe names the failure, exit code 1 after --worker-failure-exit-seconds."""
    import asyncio

    from common.config import resolve
    from neuron import cli
    from neuron.device import parse_devices
    from neuron.worker import CallJob, DeviceWorker

    worker = DeviceWorker(parse_devices("cpu")[0], 1 << 30)
    worker.start()
    monkeypatch.setattr(cli, "build_workers", lambda settings: [worker])
    port_file = tmp_path / "port"
    args = cli.build_parser().parse_args(["serve", "--listen", "127.0.0.1:0", "--port-file", str(port_file),
                                          "--model-root", str(MODELS), "--worker-failure-exit-seconds", "1",
                                          "--drain-seconds", "0"])
    settings = resolve(args, cli.SETTINGS, "NEURON")

    def crash(backend):
        raise _Bug("simulated bug in the device thread")

    from common.security.settings import ServerSecurity
    security = ServerSecurity.from_settings(settings)  # no credentials: an open server, as in the other tests

    async def scenario():
        serving = asyncio.create_task(cli.serve_forever(settings, security))
        while not (port_file.exists() and port_file.read_text()):
            await asyncio.sleep(0.02)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                health_pb2.HealthCheckResponse.SERVING
            worker.submit(CallJob(crash))
            for _ in range(100):
                if (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                        health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("health stayed SERVING with a dead device worker")
            device = (await neuron_pb2_grpc.NeuronStub(ch).Describe(pb.DescribeRequest(), timeout=5)).devices[0]
            assert "simulated bug" in device.error
        return await asyncio.wait_for(serving, 30)

    assert asyncio.run(scenario()) == 1
