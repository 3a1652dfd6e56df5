"""A hung neuron (SIGSTOP) does not hold cortex's streams: the one in flight ends UNAVAILABLE soon
after the node is marked DOWN (well under the old 60 s keepalive), a request sent after is refused
at once, and the node serves again once it runs."""
from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from tests.helpers import start_cortex, start_neuron, wait_until


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "long", LlamaShape(max_position_embeddings=8192))
    neuron = start_neuron(model_roots=[root])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "1"])
    try:
        yield cortex, neuron
    finally:
        for server in (cortex, neuron):
            if server.proc.poll() is None:
                os.kill(server.proc.pid, signal.SIGCONT)
            server.kill()


def _generate(stub, max_tokens, timeout):
    return stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hello"),
                                             sampling=cpb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                         timeout=timeout)


def test_a_stream_on_a_hung_node_ends_unavailable_and_new_requests_are_refused(fleet):
    cortex, neuron = fleet
    channel = cortex.channel()
    stub = cortex_pb2_grpc.CortexStub(channel)
    wait_until(lambda: stub.ListNodes(cpb.ListNodesRequest()).nodes[0].state == cpb.NODE_STATE_UP, what="node UP")
    list(stub.LoadModel(cpb.LoadModelRequest(name="long", path="long", max_context=8192, kv_slots=2), timeout=60))
    stream = _generate(stub, 8000, timeout=90)  # many seconds of tokens
    next(stream)
    os.kill(neuron.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    with pytest.raises(grpc.RpcError) as ended:
        for _ in stream:
            pass
    took = time.monotonic() - stopped
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
    assert took < 20, f"the stream on the hung node took {took:.1f}s to end"

    asked = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        list(_generate(stub, 4, timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert time.monotonic() - asked < 5

    os.kill(neuron.proc.pid, signal.SIGCONT)
    wait_until(lambda: stub.ListNodes(cpb.ListNodesRequest()).nodes[0].state == cpb.NODE_STATE_UP, timeout=30,
               what="node UP again")
    chunks = list(_generate(stub, 3, timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
    channel.close()


def test_a_client_stream_on_a_hung_cortex_ends_unavailable_by_keepalive(fleet):
    cortex, _ = fleet
    channel = cortex.channel()  # the project's channel options (keepalive)
    stub = cortex_pb2_grpc.CortexStub(channel)
    wait_until(lambda: any(m.name == "long" and m.state == cpb.MODEL_STATE_READY
                           for m in stub.ListModels(cpb.ListModelsRequest()).models), timeout=30, what="long READY")
    stream = _generate(stub, 8000, timeout=90)
    next(stream)
    os.kill(cortex.proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        took = time.monotonic() - stopped
    finally:
        os.kill(cortex.proc.pid, signal.SIGCONT)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value.details()
    assert took < 20, f"the stream on the hung cortex took {took:.1f}s to end"
    channel.close()
