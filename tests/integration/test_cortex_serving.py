"""cortex with two real neurons on loopback: load, generate, forward and unload through cortex match
the transformers references; loads are single-flight; cancellation and deadlines reach the neuron;
tensor-parallel groups are formed by cortex; bad requests get the right status and leave the
service working; and a client with no .proto files can drive everything by reflection."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from cortex.client import CortexClient
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint
from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

# Big enough that loading takes a noticeable moment and a long generation runs for many seconds.
MEDIUM = LlamaShape(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=16, num_kv_heads=4,
                    max_position_embeddings=32768)
MEDIUM_CONTEXT = 16384


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_checkpoint(root / "medium", MEDIUM, dtype="float32")
    return root


@pytest.fixture(scope="module")
def fleet(medium_root):
    """Two neurons with two CPU devices each, and a cortex that knows them (static)."""
    neurons = [start_neuron("cpu:0,cpu:1", [MODELS, medium_root]) for _ in range(2)]
    cortex = start_cortex([n.address for n in neurons], extra=["--poll-seconds", "0.5"])
    try:
        yield cortex, neurons
    finally:
        for server in [cortex, *neurons]:
            server.kill()


@pytest.fixture(scope="module")
def client(fleet):
    cortex, _ = fleet
    with CortexClient(cortex.address, timeout=30) as c:
        wait_until(lambda: sum(n.state == cpb.NODE_STATE_UP for n in c.nodes()) == 2, what="both neurons UP")
        yield c


@pytest.fixture(scope="module")
def ready(client):
    """A model that stays loaded for the module: the 'next valid call' of the bad-input tests."""
    info = client.load("llama2", name="ready")
    assert info.state == cpb.MODEL_STATE_READY
    return info


def describe(address: str) -> npb.DescribeResponse:
    with grpc.insecure_channel(address) as channel:
        return neuron_pb2_grpc.NeuronStub(channel).Describe(npb.DescribeRequest(), timeout=5)


def shards_named(neurons, model: str) -> list[tuple[str, str, int]]:
    return [(n.address, d.id, s.handle) for n in neurons for d in describe(n.address).devices for s in d.shards
            if s.model == model]


def greedy(client: CortexClient, name: str, prompt: list[int], n: int = 32) -> list[int]:
    return [t for chunk in client.generate(name, token_ids=prompt, max_tokens=n, temperature=0, ignore_eos=True,
                                           timeout=60) for t in chunk.token_ids]


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_still_serving(client: CortexClient, ready: cpb.ModelInfo, refused: str = ""):
    """After a refused request: the next valid call works, and the refused name left nothing behind."""
    assert len(greedy(client, ready.name, [1, 5, 9], n=2)) == 2
    models = {m.name: m for m in client.models()}
    assert models["ready"].state == cpb.MODEL_STATE_READY
    assert refused not in models


# ---------------------------------------------------------------- fleet

def test_nodes_lists_both_neurons_with_devices_and_memory(client, fleet):
    _, neurons = fleet
    nodes = client.nodes()
    assert sorted(n.address for n in nodes) == sorted(n.address for n in neurons)
    for node in nodes:
        assert node.state == cpb.NODE_STATE_UP and node.source == "static" and not node.reason
        assert [d.id for d in node.devices] == ["cpu:0", "cpu:1"]
        assert all(0 < d.free_bytes <= d.total_bytes for d in node.devices)
        assert 0 <= node.last_seen_seconds_ago < 5


# ---------------------------------------------------------------- load / generate / forward / unload

@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_load_generate_forward_unload_match_the_reference(client, fleet, fixture):
    _, neurons = fleet
    ref = np.load(REFERENCE / f"{fixture}.npz")
    events = list(client.load_stream(fixture, name=f"m-{fixture}", timeout=60))
    info = events[-1]
    assert isinstance(info, cpb.ModelInfo) and info.state == cpb.MODEL_STATE_READY
    progress = [e for e in events[:-1] if not e.message]
    assert progress and progress[-1].bytes_done == progress[-1].bytes_total > 0
    assert any("placing" in e.message for e in events[:-1])
    assert info.tp == 1 and len(info.placement) == 1 and info.placement[0].handle
    assert info.vocab_size == ref["logits_last"].shape[0] and info.weight_bytes > 0 and info.estimate
    placed = info.placement[0]
    assert shards_named(neurons, info.name) == [(placed.node, placed.device, placed.handle)]

    prompt = ref["prompt_ids"].tolist()
    assert greedy(client, info.name, prompt) == ref["greedy_ids"].tolist()
    logits = client.forward(info.name, prompt, all_positions=True)
    assert logits.shape == ref["logits_all"].shape
    assert rel_l2(logits, ref["logits_all"]) < 1e-4
    assert rel_l2(client.forward(info.name, prompt), ref["logits_last"]) < 1e-4

    assert client.unload(info.name) > 0
    assert info.name not in {m.name for m in client.models()}
    assert shards_named(neurons, info.name) == []


def test_text_and_chat_prompts_stream_text_with_usage_and_timing(client, ready):
    chunks = list(client.generate(ready.name, "The cortex", max_tokens=12, ignore_eos=True, timeout=30))
    assert "".join(c.text for c in chunks) and sum(len(c.token_ids) for c in chunks) == 12
    final = chunks[-1]
    assert final.finish_reason == cpb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens > 0 and final.timing.time_to_first_token_ms > 0
    chat = list(client.generate(ready.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                ignore_eos=True, timeout=30))
    assert chat[-1].usage.completion_tokens == 3


def test_models_lists_placement_state_and_context(client, ready):
    (info,) = [m for m in client.models() if m.name == "ready"]
    assert info.state == cpb.MODEL_STATE_READY and info.path == "llama2" and info.dtype == "float32"
    assert info.architecture == "LlamaForCausalLM" and info.max_context == 256
    assert [(p.rank, p.handle) for p in info.placement] == [(0, ready.placement[0].handle)]


def test_concurrent_loads_of_one_name_are_one_load(client, fleet):
    _, neurons = fleet
    start = threading.Barrier(3)

    def load():
        start.wait()
        return list(client.load_stream("medium", name="twice", max_context=MEDIUM_CONTEXT, kv_slots=1, timeout=60))

    with ThreadPoolExecutor(3) as pool:
        results = [f.result() for f in [pool.submit(load) for _ in range(3)]]
    infos = [events[-1] for events in results]
    assert all(i.state == cpb.MODEL_STATE_READY for i in infos)
    assert len({i.placement[0].handle for i in infos}) == 1
    # The calls start together and a load takes a while: the later ones join the first one's load
    # (normally both; one is enough to show it, and stays true on a starved machine).
    followers = [e for events in results for e in events[:-1] if "already being loaded" in e.message]
    assert 1 <= len(followers) <= 2
    assert len(shards_named(neurons, "twice")) == 1
    # Loading the same name again returns at once; another checkpoint under that name is refused.
    assert client.load("medium", name="twice").placement[0].handle == infos[0].placement[0].handle
    with pytest.raises(grpc.RpcError) as err:
        client.load("llama3", name="twice")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "path medium" in err.value.details()
    client.unload("twice")
    assert shards_named(neurons, "twice") == []


# ---------------------------------------------------------------- cancellation and deadlines

def test_a_load_whose_caller_leaves_is_cancelled_and_leaves_nothing(client, fleet):
    _, neurons = fleet
    events = client.load_stream("medium", name="abandoned", max_context=MEDIUM_CONTEXT)
    while not next(events).bytes_done:  # the shard is being read...
        pass
    events.close()  # ...when the caller goes away (Ctrl-C): the load stops and gives back what it took
    wait_until(lambda: "abandoned" not in {m.name for m in client.models()} and not shards_named(neurons, "abandoned"),
               what="the abandoned load released")
    assert client.load("medium", name="abandoned", max_context=MEDIUM_CONTEXT).state == cpb.MODEL_STATE_READY
    client.unload("abandoned")
    assert shards_named(neurons, "abandoned") == []


@pytest.fixture(scope="module")
def slow(client):
    """One KV slot: a generation still running on the neuron would hold up the next one."""
    info = client.load("medium", name="slow", max_context=MEDIUM_CONTEXT, kv_slots=1, timeout=60)
    chunks = list(client.generate("slow", token_ids=[1, 5, 9], max_tokens=64, ignore_eos=True, timeout=60))
    rate = chunks[-1].timing.decode_tokens_per_second
    # Enough tokens for a generation that would run >= 30 s, if nothing stopped it.
    max_tokens = min(MEDIUM_CONTEXT - 8, int(rate * 30))
    if max_tokens / rate < 20:
        pytest.skip(f"this machine decodes too fast ({rate:.0f} tokens/s) for a generation to outlast the check")
    yield info, max_tokens
    client.unload("slow")


def time_to_first_token(client: CortexClient) -> float:
    started = time.monotonic()
    next(iter(client.generate("slow", token_ids=[1, 2], max_tokens=1, timeout=30)))
    return time.monotonic() - started


def test_a_cancelled_generate_stops_on_the_neuron(client, slow):
    _, max_tokens = slow
    stream = client.generate("slow", token_ids=[1, 5, 9], max_tokens=max_tokens, ignore_eos=True)
    next(stream)
    stream.close()  # cancels the call to cortex, which must cancel its call to the neuron
    assert time_to_first_token(client) < 5.0


def test_the_client_deadline_reaches_the_neuron(client, slow):
    _, max_tokens = slow
    with pytest.raises(grpc.RpcError) as err:
        for _ in client.generate("slow", token_ids=[1, 5, 9], max_tokens=max_tokens, ignore_eos=True, timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time_to_first_token(client) < 5.0


# ---------------------------------------------------------------- tensor parallelism

def load_tp(client: CortexClient, path: str, name: str, tp: int) -> cpb.ModelInfo:
    try:
        return client.load(path, name=name, tp=tp, timeout=120)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip(f"the neurons do not implement tensor parallelism yet: {err.details()}")
        raise


@pytest.mark.parametrize("fixture, tp", [("llama3", 2), ("qwen3", 4)])
def test_tensor_parallel_load_matches_the_reference_and_unloads_every_rank(client, fleet, fixture, tp):
    _, neurons = fleet
    ref = np.load(REFERENCE / f"{fixture}.npz")
    info = load_tp(client, fixture, f"tp-{fixture}", tp)
    assert info.state == cpb.MODEL_STATE_READY and info.tp == tp
    assert [p.rank for p in info.placement] == list(range(tp))
    nodes = {p.node for p in info.placement}
    # tp=2 fits on one neuron's two devices; tp=4 needs both neurons.
    assert len(nodes) == (1 if tp == 2 else 2)
    assert sorted((p.node, p.device, p.handle) for p in info.placement) == sorted(shards_named(neurons, info.name))
    prompt = ref["prompt_ids"].tolist()
    assert rel_l2(client.forward(info.name, prompt, all_positions=True), ref["logits_all"]) < 1e-4
    assert greedy(client, info.name, prompt) == ref["greedy_ids"].tolist()
    client.unload(info.name)
    assert shards_named(neurons, info.name) == []


def test_unshardable_tensor_parallel_size_is_refused_and_leaves_nothing(client, ready):
    with pytest.raises(grpc.RpcError) as err:
        client.load("llama2", name="three", tp=3)  # 4 heads do not split over 3 ranks
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot shard" in err.value.details()
    assert_still_serving(client, ready, "three")


# ---------------------------------------------------------------- bad input

def generate_request(**fields) -> cpb.GenerateRequest:
    fields.setdefault("model", "ready")
    fields.setdefault("prompt", cpb.Prompt(tokens=cpb.TokenIds(ids=[1, 2, 3])))
    return cpb.GenerateRequest(**fields)


BAD_GENERATES = [
    ("unknown model", generate_request(model="nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not loaded"),
    ("empty model", generate_request(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model is empty"),
    ("no prompt", cpb.GenerateRequest(model="ready"), grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
    ("empty token list", generate_request(prompt=cpb.Prompt(tokens=cpb.TokenIds())),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt.tokens.ids is empty"),
    ("empty chat", generate_request(prompt=cpb.Prompt(chat=cpb.Chat())),
     grpc.StatusCode.INVALID_ARGUMENT, "prompt.chat.messages is empty"),
    ("token out of vocab", generate_request(prompt=cpb.Prompt(tokens=cpb.TokenIds(ids=[1, 99999]))),
     grpc.StatusCode.INVALID_ARGUMENT, "out of the vocabulary"),
    ("negative temperature", generate_request(sampling=cpb.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    ("top_p zero", generate_request(sampling=cpb.SamplingParams(top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
]


@pytest.mark.parametrize("label, request_, code, text", BAD_GENERATES, ids=[b[0] for b in BAD_GENERATES])
def test_bad_generate_requests(client, fleet, ready, label, request_, code, text):
    cortex, _ = fleet
    with grpc.insecure_channel(cortex.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(cortex_pb2_grpc.CortexStub(channel).Generate(request_, timeout=10))
    assert err.value.code() == code and text in err.value.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT and "empty" not in text:
        # Judged by the neuron: relayed with its code, and the node named.
        assert err.value.details().startswith(f"node {ready.placement[0].node}: ")
    assert_still_serving(client, ready)


BAD_FORWARDS = [
    ("unknown model", cpb.ForwardRequest(model="nope", token_ids=[1]), grpc.StatusCode.NOT_FOUND, "not loaded"),
    ("no tokens", cpb.ForwardRequest(model="ready"), grpc.StatusCode.INVALID_ARGUMENT, "token_ids is empty"),
    ("token out of vocab", cpb.ForwardRequest(model="ready", token_ids=[450]), grpc.StatusCode.INVALID_ARGUMENT,
     "token_ids[0] = 450"),
]


@pytest.mark.parametrize("label, request_, code, text", BAD_FORWARDS, ids=[b[0] for b in BAD_FORWARDS])
def test_bad_forward_requests(client, fleet, ready, label, request_, code, text):
    cortex, _ = fleet
    with grpc.insecure_channel(cortex.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            cortex_pb2_grpc.CortexStub(channel).Forward(request_, timeout=10)
    assert err.value.code() == code and text in err.value.details()
    assert_still_serving(client, ready)


BAD_LOADS = [
    ("empty name", dict(path="llama2", name=""), grpc.StatusCode.INVALID_ARGUMENT, "name is empty"),
    ("bad name", dict(path="llama2", name="a b"), grpc.StatusCode.INVALID_ARGUMENT, "name 'a b' is not allowed"),
    ("empty path", dict(path="", name="x"), grpc.StatusCode.INVALID_ARGUMENT, "path is empty"),
    ("bad dtype", dict(path="llama2", name="x", dtype="int4"), grpc.StatusCode.INVALID_ARGUMENT, "dtype 'int4'"),
    ("device without node", dict(path="llama2", name="x", device="cpu:0"), grpc.StatusCode.INVALID_ARGUMENT,
     "node is not"),
    ("unknown node", dict(path="llama2", name="x", node="10.9.9.9:1"), grpc.StatusCode.INVALID_ARGUMENT,
     "node '10.9.9.9:1' is not in the fleet"),
    ("tp too large", dict(path="llama2", name="x", tp=1000), grpc.StatusCode.INVALID_ARGUMENT, "tp 1000"),
    ("more ranks than devices", dict(path="medium", name="x", tp=8), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "each of 8 devices"),
    ("missing checkpoint", dict(path="no-such-model", name="x"), grpc.StatusCode.NOT_FOUND, "does not exist"),
    ("outside the model roots", dict(path="/etc", name="x"), grpc.StatusCode.PERMISSION_DENIED, "model roots"),
    ("half precision on cpu", dict(path="llama2", name="x", dtype="float16"), grpc.StatusCode.INVALID_ARGUMENT,
     "not supported on CPU"),
    ("context past the model's", dict(path="llama2", name="x", max_context=100000), grpc.StatusCode.INVALID_ARGUMENT,
     "max_context"),
    ("name taken by another checkpoint", dict(path="llama3", name="ready"), grpc.StatusCode.ALREADY_EXISTS,
     "already loaded with path llama2"),
]


@pytest.mark.parametrize("label, fields, code, text", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_bad_loads_are_refused_and_leave_nothing(client, fleet, ready, label, fields, code, text):
    _, neurons = fleet
    path, name = fields.pop("path"), fields.pop("name")
    with pytest.raises(grpc.RpcError) as err:
        client.load(path, name=name, timeout=30, **fields)
    assert err.value.code() == code and text in err.value.details()
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
        assert err.value.details().startswith("node 127.0.0.1:")  # the neuron's verdict, node named
    assert shards_named(neurons, "x") == []
    assert_still_serving(client, ready, refused=name if name != "ready" else "")


def test_bad_unloads(client, ready):
    for name, code in (("nope", grpc.StatusCode.NOT_FOUND), ("", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            client.unload(name)
        assert err.value.code() == code
    assert_still_serving(client, ready)


def test_fleet_rejects_malformed_registrations_and_unknown_heartbeats(client, fleet, ready):
    cortex, _ = fleet
    with grpc.insecure_channel(cortex.address) as channel:
        fleet_stub = cortex_pb2_grpc.FleetStub(channel)
        for address in ("", "no-port", "host:99999"):
            with pytest.raises(grpc.RpcError) as err:
                fleet_stub.Register(cpb.RegisterRequest(address=address), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "address" in err.value.details()
        assert fleet_stub.Heartbeat(cpb.HeartbeatRequest(address="10.1.2.3:4"), timeout=5).known is False
    assert len(client.nodes()) == 2
    assert_still_serving(client, ready)


# ---------------------------------------------------------------- reflection only

def reflection_call(channel, pool, service: str, method: str, **fields):
    """Call service/method with a request built from descriptors found by reflection."""
    from google.protobuf import json_format, message_factory

    descriptor = pool.FindServiceByName(service).methods_by_name[method]
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    request = json_format.ParseDict(fields, request_class())
    path = f"/{service}/{method}"
    if descriptor.server_streaming:
        return list(channel.unary_stream(path, request_serializer=request_class.SerializeToString,
                                         response_deserializer=response_class.FromString)(request, timeout=30))
    return channel.unary_unary(path, request_serializer=request_class.SerializeToString,
                               response_deserializer=response_class.FromString)(request, timeout=30)


def test_a_reflection_only_client_discovers_and_calls_cortex_and_neuron(fleet, ready):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    cortex, neurons = fleet
    for server, service in ((cortex, "cortex.v1.Cortex"), (neurons[0], "neuron.v1.Neuron")):
        with grpc.insecure_channel(server.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            # A pool of its own: nothing here comes from the generated stubs.
            pool = DescriptorPool(database)
            assert {service, "grpc.health.v1.Health"} <= set(database.get_services())
            health = reflection_call(channel, pool, "grpc.health.v1.Health", "Check")
            assert health.status == 1  # SERVING
            if service == "neuron.v1.Neuron":
                assert len(reflection_call(channel, pool, service, "Describe").devices) == 2
                continue
            assert "cortex.v1.Fleet" in database.get_services()
            nodes = reflection_call(channel, pool, service, "ListNodes")
            assert {n.address for n in nodes.nodes} == {n.address for n in neurons}
            models = reflection_call(channel, pool, service, "ListModels")
            assert "ready" in {m.name for m in models.models}
            chunks = reflection_call(channel, pool, service, "Generate", model="ready",
                                     prompt={"tokens": {"ids": [1, 5, 9]}},
                                     sampling={"max_tokens": 5, "ignore_eos": True})
            assert sum(len(c.token_ids) for c in chunks) == 5
            assert chunks[-1].usage.completion_tokens == 5
