"""The neuron service end to end: loading, progress, text and chat prompts, cancellation,
handles, and every kind of bad input (status code, then the next valid call still works)."""
from __future__ import annotations

import json
import shutil
import time

import grpc
import numpy as np
import pytest

from neuron.server import logits_from_tensor
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, REFERENCE, start_neuron


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    """A model root with broken checkpoints next to a good one."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "llama2", root / "good")
    corrupt = shutil.copytree(MODELS / "llama2", root / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    gpt2 = shutil.copytree(MODELS / "llama2", root / "gpt2")
    config = json.loads((gpt2 / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (gpt2 / "config.json").write_text(json.dumps(config))
    (root / "empty").mkdir()
    # HF cache layout: models--org--name/snapshots/<rev>/ with refs/main naming the revision
    snapshot = root / "hub" / "models--tiny--llama3" / "snapshots" / "abc123"
    shutil.copytree(MODELS / "llama3", snapshot)
    (root / "hub" / "models--tiny--llama3" / "refs").mkdir()
    (root / "hub" / "models--tiny--llama3" / "refs" / "main").write_text("abc123")
    return root


@pytest.fixture(scope="module")
def server(bad_root):
    srv = start_neuron(devices="cpu:0,cpu:1", model_roots=[bad_root, MODELS], extra=["--cpu-memory-gb", "1"])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(server):
    channel = server.channel()
    yield neuron_pb2_grpc.NeuronStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def good(stub):
    events = list(stub.LoadShard(pb.LoadShardRequest(path="good", model="good", max_context=64, max_seqs=2)))
    return events[-1].loaded


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, pb.LoadShardResponse):
            list(result)
    return info.value.code(), info.value.details()


def generate(stub, handle, prompt: pb.Prompt, **sampling):
    return list(stub.Generate(pb.GenerateRequest(handle=handle, prompt=prompt, sampling=pb.SamplingParams(**sampling)),
                              timeout=60))


def still_serves(stub, handle):
    chunks = generate(stub, handle, pb.Prompt(tokens=pb.TokenIds(ids=[1, 5, 9])), max_tokens=3, ignore_eos=True)
    assert sum(len(c.token_ids) for c in chunks) == 3


def test_load_streams_progress_then_info(stub, good):
    events = list(stub.LoadShard(pb.LoadShardRequest(path="llama_sharded", model="sharded")))
    progress = [e.progress for e in events if e.HasField("progress")]
    assert progress and progress[-1].bytes_done == progress[-1].bytes_total > 0
    assert [p.tensors_done for p in progress] == sorted(p.tensors_done for p in progress)
    info = events[-1].loaded
    assert info.architecture == "LlamaForCausalLM" and info.handle not in (0, good.handle)
    described = stub.Describe(pb.DescribeRequest())
    held = {s.handle for d in described.devices for s in d.shards}
    assert {info.handle, good.handle} <= held
    assert stub.DropShard(pb.DropShardRequest(handle=info.handle)).freed_bytes > 0


def test_hf_cache_layout_resolves_to_the_snapshot(stub):
    info = list(stub.LoadShard(pb.LoadShardRequest(path="hub/models--tiny--llama3")))[-1].loaded
    assert info.path.endswith("snapshots/abc123")
    ref = np.load(REFERENCE / "llama3.npz")
    logits = logits_from_tensor(stub.Forward(pb.ForwardRequest(handle=info.handle, token_ids=ref["prompt_ids"].tolist())).logits)
    assert np.linalg.norm(logits - ref["logits_last"]) / np.linalg.norm(ref["logits_last"]) < 1e-4
    stub.DropShard(pb.DropShardRequest(handle=info.handle))


def test_handles_are_not_reused(stub):
    seen = set()
    for _ in range(3):
        info = list(stub.LoadShard(pb.LoadShardRequest(path="good", max_context=32)))[-1].loaded
        assert info.handle not in seen
        seen.add(info.handle)
        stub.DropShard(pb.DropShardRequest(handle=info.handle))
    code, _ = code_of(lambda: stub.DropShard(pb.DropShardRequest(handle=info.handle)))
    assert code == grpc.StatusCode.NOT_FOUND


def test_text_and_chat_prompts_stream_text(stub, good):
    chunks = generate(stub, good.handle, pb.Prompt(text="The miller asked about"), max_tokens=8, ignore_eos=True)
    assert "".join(c.text for c in chunks)
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].timing.total_ms > 0
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="Hello there")])
    chunks = generate(stub, good.handle, pb.Prompt(chat=chat), max_tokens=4, ignore_eos=True)
    assert chunks[-1].usage.prompt_tokens > 3


def test_seeded_sampling_is_reproducible(stub, good):
    prompt = pb.Prompt(tokens=pb.TokenIds(ids=[1, 20, 30]))
    runs = [[t for c in generate(stub, good.handle, prompt, max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
             for t in c.token_ids] for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_token_ids_end_with_stop(stub, good):
    ref = np.load(REFERENCE / "llama2.npz")
    greedy = ref["greedy_ids"].tolist()
    chunks = generate(stub, good.handle, pb.Prompt(tokens=pb.TokenIds(ids=ref["prompt_ids"].tolist())),
                      max_tokens=32, temperature=0, stop_token_ids=[greedy[3]], ignore_eos=True)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == greedy[: greedy.index(greedy[3]) + 1]
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP


def test_eos_from_generation_config_stops(stub, good):
    # The llama2 reference's greedy path emits EOS (id 2) at some step: without ignore_eos it stops there.
    ref = np.load(REFERENCE / "llama2.npz")
    greedy = ref["greedy_ids"].tolist()
    chunks = generate(stub, good.handle, pb.Prompt(tokens=pb.TokenIds(ids=ref["prompt_ids"].tolist())), max_tokens=32, temperature=0)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == greedy[: greedy.index(2) + 1]
    assert chunks[-1].stop_reason == "eos"


def test_cancelling_generate_frees_the_device(stub, good):
    # good has 2 KV slots: cancel two long generations, then a third must still get a slot.
    for _ in range(2):
        call = stub.Generate(pb.GenerateRequest(handle=good.handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 2, 3])),
                                                sampling=pb.SamplingParams(max_tokens=60, ignore_eos=True)))
        next(call)
        call.cancel()
    time.sleep(0.2)
    still_serves(stub, good.handle)


BAD_LOADS = [
    ("missing", {}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ("/etc", {}, grpc.StatusCode.PERMISSION_DENIED, "outside the model roots"),
    ("../../../../etc", {}, grpc.StatusCode.PERMISSION_DENIED, "outside the model roots"),
    ("corrupt", {}, grpc.StatusCode.INVALID_ARGUMENT, "safetensors"),
    ("gpt2", {}, grpc.StatusCode.INVALID_ARGUMENT, "GPT2LMHeadModel"),
    ("empty", {}, grpc.StatusCode.INVALID_ARGUMENT, "config.json"),
    ("good", {"dtype": "bfloat16"}, grpc.StatusCode.INVALID_ARGUMENT, "not supported on CPU"),
    ("good", {"dtype": "float8"}, grpc.StatusCode.INVALID_ARGUMENT, "float8"),
    ("good", {"device": "cpu:7"}, grpc.StatusCode.INVALID_ARGUMENT, "cpu:7"),
    ("good", {"max_context": 100000}, grpc.StatusCode.INVALID_ARGUMENT, "max_position_embeddings"),
]


@pytest.mark.parametrize("path,extra,code,text", BAD_LOADS, ids=[f"{b[0]}-{b[2].name}" for b in BAD_LOADS])
def test_bad_loads_are_refused_and_leave_nothing(stub, good, path, extra, code, text):
    before = stub.Describe(pb.DescribeRequest())
    got, details = code_of(lambda: stub.LoadShard(pb.LoadShardRequest(path=path, **extra)))
    assert got == code and text in details
    after = stub.Describe(pb.DescribeRequest())
    assert [len(d.shards) for d in after.devices] == [len(d.shards) for d in before.devices]
    still_serves(stub, good.handle)


def test_not_enough_memory_is_resource_exhausted_and_nothing_is_left(bad_root):
    # 600 kB: the weights (559 kB) fit, but not with KV for the default 256-token context.
    small = start_neuron(devices="cpu:0", model_roots=[bad_root], extra=["--cpu-memory-gb", "0.0006"])
    try:
        with small.channel() as channel:
            stub = neuron_pb2_grpc.NeuronStub(channel)
            before = stub.Describe(pb.DescribeRequest()).devices[0]
            code, details = code_of(lambda: stub.LoadShard(pb.LoadShardRequest(path="good")))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "free" in details
            after = stub.Describe(pb.DescribeRequest()).devices[0]
            assert not after.shards and after.free_bytes == before.free_bytes
            info = list(stub.LoadShard(pb.LoadShardRequest(path="good", max_context=8)))[-1].loaded
            assert info.max_context == 8 and info.kv_tokens >= 8 and info.kv_blocks_total >= 1
            # a CPU shard runs every turn eagerly and has nothing to warm up
            assert list(info.cuda_graph_batch_sizes) == [] and info.warm_up_seconds == 0
    finally:
        small.kill()


def test_unknown_handle_is_not_found(stub, good):
    for call in (lambda: stub.Forward(pb.ForwardRequest(handle=12345, token_ids=[1])),
                 lambda: stub.Generate(pb.GenerateRequest(handle=12345, prompt=pb.Prompt(text="hi"))),
                 lambda: stub.ClearKv(pb.ClearKvRequest(handle=12345)),
                 lambda: stub.DropShard(pb.DropShardRequest(handle=12345))):
        code, details = code_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "12345" in details
    still_serves(stub, good.handle)


BAD_REQUESTS = [
    ("empty prompt", pb.Prompt(), {}, "prompt is empty"),
    ("token out of vocab", pb.Prompt(tokens=pb.TokenIds(ids=[1, 99999])), {}, "99999"),
    ("prompt longer than context", pb.Prompt(tokens=pb.TokenIds(ids=[5] * 80)), {}, "context"),
    ("negative temperature", pb.Prompt(text="hi"), {"temperature": -1.0}, "temperature"),
    ("absurd temperature", pb.Prompt(text="hi"), {"temperature": 1e9}, "temperature"),
    ("top_p zero", pb.Prompt(text="hi"), {"top_p": 0.0}, "top_p"),
    ("top_p above one", pb.Prompt(text="hi"), {"top_p": 1.5}, "top_p"),
    ("min_p one", pb.Prompt(text="hi"), {"min_p": 1.0}, "min_p"),
    ("negative repetition penalty", pb.Prompt(text="hi"), {"repetition_penalty": -2.0}, "repetition_penalty"),
    ("zero max_tokens", pb.Prompt(text="hi"), {"max_tokens": 0}, "max_tokens"),
    ("stop token out of vocab", pb.Prompt(text="hi"), {"stop_token_ids": [10**6]}, "stop_token_ids"),
]


@pytest.mark.parametrize("label,prompt,sampling,text", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_generate_requests_are_invalid_argument(stub, good, label, prompt, sampling, text):
    code, details = code_of(lambda: generate(stub, good.handle, prompt, **sampling))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and text in details
    still_serves(stub, good.handle)


def test_bad_forward_requests(stub, good):
    for ids, text in (([], "empty"), ([1, 10**6], "out of the vocabulary"), ([3] * 65, "context")):
        code, details = code_of(lambda: stub.Forward(pb.ForwardRequest(handle=good.handle, token_ids=ids)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and text in details
    still_serves(stub, good.handle)


def summary(stub, handle) -> pb.ShardSummary:
    return next(s for d in stub.Describe(pb.DescribeRequest()).devices for s in d.shards if s.handle == handle)


def test_a_repeated_prompt_hits_the_prefix_cache_and_clear_kv_resets_it(stub, good):
    assert good.kv_block_size == 16 and good.max_seqs == 2
    assert good.kv_tokens == good.kv_blocks_total * good.kv_block_size >= 2 * 64  # capped at max_seqs x max_context
    stub.ClearKv(pb.ClearKvRequest(handle=good.handle))
    prompt = pb.Prompt(tokens=pb.TokenIds(ids=[(7 * i) % 200 + 5 for i in range(40)]))  # two full blocks
    first = generate(stub, good.handle, prompt, max_tokens=4, ignore_eos=True)
    before = summary(stub, good.handle)
    second = generate(stub, good.handle, prompt, max_tokens=4, ignore_eos=True)
    after = summary(stub, good.handle)
    assert [t for c in second for t in c.token_ids] == [t for c in first for t in c.token_ids]
    assert after.prefix_cache_hits - before.prefix_cache_hits == 32
    assert after.prefix_cache_queries - before.prefix_cache_queries == 40
    assert after.running == 0 and after.waiting == 0 and after.kv_blocks_used == 0
    assert stub.ClearKv(pb.ClearKvRequest(handle=good.handle)).blocks_cleared >= 2
    assert stub.ClearKv(pb.ClearKvRequest(handle=good.handle)).blocks_cleared == 0
    generate(stub, good.handle, prompt, max_tokens=4, ignore_eos=True)
    assert summary(stub, good.handle).prefix_cache_hits == after.prefix_cache_hits  # nothing cached to hit


def test_inspect_estimates_without_loading(stub):
    reply = stub.Inspect(pb.InspectRequest(path="good", max_context=64))
    assert reply.architecture == "LlamaForCausalLM" and reply.dtype == "float32"
    assert reply.weight_bytes_per_rank == reply.num_parameters * 4
    assert reply.kv_bytes_per_slot == 2 * 2 * 4 * 64 * 16 * 4  # 2 x layers x kv heads x ctx x head_dim x 4 bytes
