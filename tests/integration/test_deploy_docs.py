"""Run the operations guide's grpcurl calls against a real cortex and neuron.

Each documented `grpcurl -d BODY ADDR Service/Method` becomes the same call made here (the body goes
through protobuf's JSON mapping, as grpcurl does) against cortex ($C) or the neuron ($N). The
checkpoints the guide names are copies of the tiny llama2 fixture (with a longer context). Two substitutions, because the
neuron here has CPU devices and a 450-token vocabulary: dtype bfloat16 -> float32, and token ids
taken modulo the vocabulary. The unload runs last, so the calls after it in the guide find the
model."""
from __future__ import annotations

import json
import shutil

import grpc
import pytest
from google.protobuf import json_format, message_factory

from tests.helpers import MODELS, start_cortex, start_neuron, wait_until
from tests.unit.test_operations_doc import grpcurl_calls, method_descriptor

pytestmark = pytest.mark.slow

VOCAB = 450


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("llama-3.2-1b", "llama-3-8b"):
        shutil.copytree(MODELS / "llama2", root / name)
        config = json.loads((root / name / "config.json").read_text())
        config["max_position_embeddings"] = 8192  # the guide loads with max_context 4096
        (root / name / "config.json").write_text(json.dumps(config))
    neuron = start_neuron("cpu:0,cpu:1", [root])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5"])
    try:
        from cortex.client import CortexClient
        from common.proto.cortex.v1 import cortex_pb2 as cpb
        with CortexClient(cortex.address, timeout=10) as client:
            wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in client.nodes()), what="neuron UP")
        yield {"$C": cortex.address, "$N": neuron.address}
    finally:
        cortex.kill()
        neuron.kill()


def adapt(body: dict) -> dict:
    if body.get("dtype") == "bfloat16":
        body["dtype"] = "float32"
    if "token_ids" in body:
        body["token_ids"] = [i % VOCAB for i in body["token_ids"]]
    ids = body.get("prompt", {}).get("tokens", {}).get("ids")
    if ids:
        body["prompt"]["tokens"]["ids"] = [i % VOCAB for i in ids]
    return body


def invoke(address: str, method: str, body: str | None):
    descriptor = method_descriptor(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    request = json_format.Parse(json.dumps(adapt(json.loads(body))) if body else "{}", request_class())
    channel = grpc.insecure_channel(address)
    path = f"/{method}"
    kwargs = dict(request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
    try:
        if descriptor.server_streaming:
            call = channel.unary_stream(path, **kwargs)(request, timeout=60)
            if method.endswith("/Watch"):  # endless by design: the first status is enough
                return [next(call)]
            return list(call)
        return [channel.unary_unary(path, **kwargs)(request, timeout=60)]
    finally:
        channel.close()


def documented_calls():
    calls = [(m, b, w) for m, b, w in grpcurl_calls() if "/" in m]
    unload = [c for c in calls if c[0].endswith("/UnloadModel")]
    return [c for c in calls if c not in unload] + unload


def test_every_documented_grpcurl_call_works(servers):
    for method, body, words in documented_calls():
        address = servers[next(w for w in words if w in servers)]
        if method.endswith("/ClearKv"):
            with pytest.raises(grpc.RpcError) as err:
                invoke(address, method, body)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the guide's handle is an example
            continue
        replies = invoke(address, method, body)
        assert replies, method
        last = replies[-1]
        if method == "grpc.health.v1.Health/Check" or method.endswith("/Watch"):
            assert last.status == 1, f"{method}: {last}"  # SERVING
        elif method.endswith("/LoadModel"):
            assert last.model.state == 2 and last.model.tp == 2, last  # READY, over two devices
        elif method.endswith("/Generate"):
            assert last.finish_reason != 0 and last.usage.completion_tokens > 0, last
        elif method.endswith("/Forward"):
            assert list(last.logits.shape) == [VOCAB]
        elif method.endswith("/ListNodes"):
            assert last.nodes and last.nodes[0].devices
        elif method.endswith("/Describe"):
            assert [d.id for d in last.devices] == ["cpu:0", "cpu:1"]
        elif method.endswith("/Inspect"):
            assert last.weight_bytes_per_rank > 0
