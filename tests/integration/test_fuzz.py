"""A structured fuzz over every RPC of both servers: random values for every field of each request
message (empty, huge, NUL-laden and path-like strings; extreme numbers; unknown enum values; nested
messages; long repeated fields) and random bytes as the raw request. No answer may be INTERNAL or
UNKNOWN (those mean a bug, not a bad request), no call may hang past its deadline, and valid calls
work afterwards. Bounded: a fixed seed, a few hundred cases."""
from __future__ import annotations

import random

import grpc
import pytest
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, start_cortex, start_neuron, wait_until

SEED = 16
CASES_PER_METHOD = 14        # structured messages per RPC
RAW_CASES_PER_METHOD = 4     # random byte strings per RPC
CALL_TIMEOUT_S = 10
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

STRINGS = ["", "\0", "a\0b", "x" * 65536, "../../../../etc/passwd", "/etc", "llama2", "fuzzed", "cpu", "cpu:0",
           "cpu:99", "0", "127.0.0.1:1", "host:99999", ":", "é☃\U0001f600", "{{ 7 * 7 }}", "model/../../x",
           "tcp1 127.0.0.1:1/abc", " ", "%s%n", "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace")]
INTS = [0, 1, 2, 3, 7, 64, 255, 256, 4096, 65535, 1 << 31, (1 << 32) - 1]
SIGNED = [0, -1, 1, -(1 << 31), (1 << 31) - 1]
BIG = [0, 1, (1 << 63) - 1, 1 << 62, (1 << 64) - 1]
FLOATS = [0.0, -1.0, 0.5, 1.0, 2.0, 1e30, -1e30, float("inf"), float("nan"), 1e-30]


def _value(field: _descriptor.FieldDescriptor, rng: random.Random, handles: list[int]):
    t = field.type
    if t == field.TYPE_STRING:
        return rng.choice(STRINGS)
    if t == field.TYPE_BYTES:
        return rng.choice([b"", b"\0" * 128, rng.randbytes(rng.choice([1, 16, 128, 4096])),
                           b"tcp1 " + rng.randbytes(60)])
    if t == field.TYPE_BOOL:
        return rng.random() < 0.5
    if t in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
        return rng.choice(FLOATS)
    if t == field.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [999])
    if t in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_SFIXED32):
        return rng.choice(SIGNED)
    if t in (field.TYPE_INT64, field.TYPE_SINT64, field.TYPE_SFIXED64):
        return rng.choice(SIGNED + [-(1 << 63), (1 << 63) - 1])
    if t in (field.TYPE_UINT64, field.TYPE_FIXED64):
        return rng.choice(BIG + handles * 3)  # real shard handles reach the deep paths
    if t in (field.TYPE_UINT32, field.TYPE_FIXED32):
        return rng.choice(INTS)
    raise AssertionError(f"unhandled field type {t}")


def random_message(cls, rng: random.Random, handles: list[int], depth: int = 0):
    message = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue  # left unset
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if field.type == field.TYPE_MESSAGE:
            if depth >= 3:
                continue
            sub = message_factory.GetMessageClass(field.message_type)
            if repeated:
                for _ in range(rng.choice([0, 1, 2, 5])):
                    getattr(message, field.name).add().CopyFrom(random_message(sub, rng, handles, depth + 1))
            else:
                getattr(message, field.name).CopyFrom(random_message(sub, rng, handles, depth + 1))
            continue
        if repeated:
            count = rng.choice([0, 1, 3, 50, 20_000 if field.type == field.TYPE_UINT32 else 10])
            getattr(message, field.name).extend(_value(field, rng, handles) for _ in range(count))
        else:
            setattr(message, field.name, _value(field, rng, handles))
    return message


# Run last: they may remove what the other calls need to reach deep paths.
DESTRUCTIVE = ("UnloadModel", "DropShard", "DestroyGroup", "ClearKv")


def _methods(service: _descriptor.ServiceDescriptor):
    for method in sorted(service.methods, key=lambda m: m.name in DESTRUCTIVE):
        yield (f"/{service.full_name}/{method.name}", message_factory.GetMessageClass(method.input_type),
               method.client_streaming, method.server_streaming)


def _call(channel, path, payload: bytes, client_streaming: bool, server_streaming: bool):
    """Send raw bytes (identity serializers); read every response; return the status code."""
    ident = dict(request_serializer=None, response_deserializer=None)
    try:
        if client_streaming:
            call = channel.stream_stream(path, **ident)(iter([payload, payload]), timeout=CALL_TIMEOUT_S)
            for _ in call:
                pass
        elif server_streaming:
            for _ in channel.unary_stream(path, **ident)(payload, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path, **ident)(payload, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def fleet():
    neuron = start_neuron(model_roots=[MODELS], extra=["--max-group-timeout-ms", "500"])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5"])
    try:
        yield cortex, neuron
    finally:
        cortex.kill()
        neuron.kill()


def _ready(cortex, neuron):
    """What the fuzz needs to reach deep paths: a model on cortex and a shard on the neuron."""
    cch, nch = cortex.channel(), neuron.channel()
    cstub, nstub = cortex_pb2_grpc.CortexStub(cch), neuron_pb2_grpc.NeuronStub(nch)
    wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in cstub.ListNodes(cpb.ListNodesRequest()).nodes),
               what="the neuron UP")
    list(cstub.LoadModel(cpb.LoadModelRequest(name="llama2", path="llama2", max_context=64, kv_slots=2), timeout=60))
    direct = list(nstub.LoadShard(npb.LoadShardRequest(path="llama3", model="direct", max_context=64, max_seqs=2),
                                  timeout=60))[-1].loaded.handle
    handles = [direct] + [p.handle for m in cstub.ListModels(cpb.ListModelsRequest()).models for p in m.placement]
    return cch, nch, cstub, nstub, handles


def test_no_rpc_answers_internal_or_unknown_to_random_requests(fleet):
    cortex, neuron = fleet
    cch, nch, cstub, nstub, handles = _ready(cortex, neuron)
    rng = random.Random(SEED)
    targets = [(cch, cpb.DESCRIPTOR.services_by_name[name]) for name in ("Cortex", "Fleet")]
    targets.append((nch, npb.DESCRIPTOR.services_by_name["Neuron"]))
    bugs, cases = [], 0
    for channel, service in targets:
        for path, cls, client_streaming, server_streaming in _methods(service):
            payloads = [random_message(cls, rng, handles).SerializeToString() for _ in range(CASES_PER_METHOD)]
            payloads += [rng.randbytes(rng.choice([1, 7, 100, 3000])) for _ in range(RAW_CASES_PER_METHOD)]
            for payload in payloads:
                code, details = _call(channel, path, payload, client_streaming, server_streaming)
                cases += 1
                # A status message past the metadata limit arrives as RESOURCE_EXHAUSTED: the real
                # code is lost, so it counts as a bug too.
                lost = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata size" in details
                if code in BUG_CODES or code == grpc.StatusCode.DEADLINE_EXCEEDED or lost:
                    bugs.append(f"{path}: {code.name}: {details[:300]}")
                assert len(details) <= 8192, f"{path}: a {len(details)}-character status message"
    assert cases >= 300
    assert not bugs, "\n".join(bugs)

    # Both servers still serve valid calls.
    if not any(m.name == "llama2" for m in cstub.ListModels(cpb.ListModelsRequest()).models):
        list(cstub.LoadModel(cpb.LoadModelRequest(name="llama2", path="llama2", max_context=64), timeout=60))
    wait_until(lambda: any(m.name == "llama2" and m.state == cpb.MODEL_STATE_READY
                           for m in cstub.ListModels(cpb.ListModelsRequest()).models), what="llama2 READY")
    chunks = list(cstub.Generate(cpb.GenerateRequest(model="llama2", prompt=cpb.Prompt(text="hello"),
                                                     sampling=cpb.SamplingParams(max_tokens=3, ignore_eos=True)),
                                 timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 3
    assert nstub.Describe(npb.DescribeRequest(), timeout=10).devices
    cch.close()
    nch.close()
