"""A client that gives up must not take a device down: requests cancelled or past their deadline
while they wait for a KV slot leave the device serving, and health keeps telling the truth."""
from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, start_neuron

PROMPT = pb.Prompt(tokens=pb.TokenIds(ids=[1, 5, 9]))
HOLDER_TOKENS = 1000  # long enough that the holder still runs while the others wait and give up


@pytest.fixture(scope="module")
def neuron(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "llama2").mkdir()
    for f in (MODELS / "llama2").iterdir():  # llama2 with a context that fits the holder
        (root / "llama2" / f.name).write_bytes(f.read_bytes())
    config = json.loads((root / "llama2" / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (root / "llama2" / "config.json").write_text(json.dumps(config))
    srv = start_neuron(model_roots=[root])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def channel(neuron):
    ch = neuron.channel()
    yield ch
    ch.close()


def _health(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _long_generation(stub, handle):
    call = stub.Generate(pb.GenerateRequest(handle=handle, prompt=PROMPT,
                                            sampling=pb.SamplingParams(max_tokens=HOLDER_TOKENS, ignore_eos=True)), timeout=60)
    first = next(call)  # it holds the only KV slot from here until it finishes
    return call, len(first.token_ids)


def test_requests_that_give_up_while_waiting_for_a_slot_leave_the_device_serving(channel):
    stub = neuron_pb2_grpc.NeuronStub(channel)
    shard = list(stub.LoadShard(pb.LoadShardRequest(path="llama2", model="one-slot", max_seqs=1)))[-1].loaded
    assert shard.max_seqs == 1
    for round_ in range(4):
        holder, received = _long_generation(stub, shard.handle)
        # Past its deadline while it waits for the slot the holder has ...
        with pytest.raises(grpc.RpcError) as late:
            list(stub.Generate(pb.GenerateRequest(handle=shard.handle, prompt=PROMPT,
                                                  sampling=pb.SamplingParams(max_tokens=4)), timeout=0.02))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # ... and cancelled by its caller while it waits.
        cancelled = stub.Generate(pb.GenerateRequest(handle=shard.handle, prompt=PROMPT,
                                                     sampling=pb.SamplingParams(max_tokens=4)), timeout=60)
        cancelled.cancel()
        assert received + sum(len(c.token_ids) for c in holder) == HOLDER_TOKENS, \
            f"round {round_}: the holder did not finish"
    # Later requests are served, and health says so.
    chunks = list(stub.Generate(pb.GenerateRequest(handle=shard.handle, prompt=PROMPT,
                                                   sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)),
                                timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
    assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
    device = stub.Describe(pb.DescribeRequest()).devices[0]
    assert not device.error
    stub.DropShard(pb.DropShardRequest(handle=shard.handle))
