"""Overload is answered, never silent: past --max-inflight-calls a server refuses with
RESOURCE_EXHAUSTED (health still answers), so gRPC's own pending-call limit (which cancels calls
with a bare CANCELLED the application never sees) is never reached; and cortex logs every
cancellation with who cancelled."""
from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from tests.helpers import start_cortex, start_neuron, wait_until


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "long", LlamaShape(max_position_embeddings=8192))
    neuron = start_neuron(model_roots=[root])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5", "--max-inflight-calls", "2"])
    yield cortex, neuron
    cortex.kill()
    neuron.kill()


def _long(stub):
    stream = stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hello"),
                                               sampling=cpb.SamplingParams(max_tokens=6000, ignore_eos=True)),
                           timeout=120)
    next(stream)
    return stream


def test_calls_past_the_inflight_limit_are_resource_exhausted_and_cancellations_are_logged(fleet):
    cortex, _ = fleet
    channel = cortex.channel()
    stub = cortex_pb2_grpc.CortexStub(channel)
    wait_until(lambda: stub.ListNodes(cpb.ListNodesRequest()).nodes[0].state == cpb.NODE_STATE_UP, what="node UP")
    list(stub.LoadModel(cpb.LoadModelRequest(name="long", path="long", max_context=8192, kv_slots=4), timeout=60))
    held = [_long(stub), _long(stub)]
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hi")), timeout=30))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-inflight-calls" in refused.value.details()
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.ListModels(cpb.ListModelsRequest(), timeout=5).models  # listings are exempt
    for stream in held:
        stream.cancel()

    def cancellations():
        lines = [json.loads(line) for line in cortex.log().splitlines() if line.startswith("{")]
        return [x for x in lines if x.get("event") == "generate" and x.get("code") == "CANCELLED"]
    logged = wait_until(lambda: (found := cancellations()) and len(found) >= 2 and found, what="two logged cancellations")
    assert all(x["cancelled_by"] == "client" and x["level"] == "warning" for x in logged)
    chunks = list(stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hi"),
                                                    sampling=cpb.SamplingParams(max_tokens=2, ignore_eos=True)),
                                timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 2
    channel.close()
