"""cortex.v1's own messages mirror the neuron.v1 ones they started from (names, numbers, types, so
the JSON grpcurl users send keeps working), and cortex/api/convert.py carries every field across."""
from __future__ import annotations

import pytest
from google.protobuf import json_format

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.api import convert
from cortex.client import finish_reason, model_state, node_state
from tests.unit.cortex_fakes import device, node, shard

MIRRORED = ["ChatMessage", "Chat", "TokenIds", "Prompt", "SamplingParams", "Usage", "Timing", "GenerateResponse",
            "Tensor", "ForwardResponse", "ShardSummary", "Device", "LoadProgress"]


def fields(message_class) -> dict[str, tuple]:
    """name -> (number, type, repeated, presence, oneof, message or enum type name)."""
    def kind(f) -> str:
        return f.message_type.name if f.message_type else (f.enum_type.name if f.enum_type else "")

    def repeated(f) -> bool:
        return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED

    return {f.name: (f.number, f.type, repeated(f), f.has_presence,
                     f.containing_oneof.name if f.containing_oneof else "", kind(f))
            for f in message_class.DESCRIPTOR.fields}


@pytest.mark.parametrize("name", MIRRORED)
def test_a_public_message_has_the_fields_of_the_one_it_mirrors(name):
    assert fields(getattr(cpb, name)) == fields(getattr(npb, name))


def test_the_finish_reasons_have_the_same_names_and_numbers():
    assert ({v.name: v.number for v in cpb.FinishReason.DESCRIPTOR.values}
            == {v.name: v.number for v in npb.FinishReason.DESCRIPTOR.values})


def test_todays_grpcurl_json_parses_into_the_public_request():
    body = ('{"model": "llama", "prompt": {"chat": {"messages": [{"role": "user", "content": "Hi!"}]}},'
            ' "sampling": {"max_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 1, "stop": ["\\n"]},'
            ' "request_id": "r1"}')
    request = json_format.Parse(body, cpb.GenerateRequest())
    downstream = convert.generate_request(request, handle=5, request_id="r1")
    assert json_format.MessageToDict(downstream, preserving_proto_field_name=True) == {
        "handle": "5", "request_id": "r1", "prompt": {"chat": {"messages": [{"role": "user", "content": "Hi!"}]}},
        "sampling": {"max_tokens": 64, "temperature": pytest.approx(0.7), "top_p": pytest.approx(0.9), "seed": "1",
                     "stop": ["\n"]}}


def test_unset_sampling_fields_stay_unset_and_zero_is_kept():
    sampling = convert.sampling(cpb.SamplingParams(temperature=0.0, top_k=0))
    assert sampling.HasField("temperature") and sampling.HasField("top_k")
    assert not sampling.HasField("max_tokens") and not sampling.HasField("seed")


@pytest.mark.parametrize("prompt", [cpb.Prompt(text="hi"), cpb.Prompt(tokens=cpb.TokenIds(ids=[1, 2])),
                                    cpb.Prompt(chat=cpb.Chat(messages=[cpb.ChatMessage(role="user", content="x")])),
                                    cpb.Prompt()])
def test_every_kind_of_prompt_crosses_as_is(prompt):
    assert convert.prompt(prompt).SerializeToString() == prompt.SerializeToString()


def test_a_final_generate_chunk_crosses_with_usage_timing_and_the_request_id():
    chunk = npb.GenerateResponse(token_ids=[4, 5], text="ab", finish_reason=npb.FINISH_REASON_LENGTH,
                                 stop_reason="max_tokens", usage=npb.Usage(prompt_tokens=3, completion_tokens=2),
                                 timing=npb.Timing(time_to_first_token_ms=1.5, total_ms=3.0,
                                                   decode_tokens_per_second=100.0))
    chunk.request_id = "req-9"
    reply = convert.generate_response(chunk, "req-9")
    assert reply.SerializeToString() == chunk.SerializeToString()
    assert finish_reason(reply) == "length"
    middle = convert.generate_response(npb.GenerateResponse(token_ids=[1], text="a"), "req-9")
    assert not middle.HasField("usage") and middle.request_id == "req-9" and finish_reason(middle) == ""


def test_nodes_devices_shards_and_progress_cross_field_by_field():
    s = shard(7, model="m", tp_rank=1, tp_size=2, group_id="g", error="", dtype="float32", weight_bytes=10,
              kv_bytes=5, path="/p", architecture="A", max_context=64, vocab_size=100)
    d = device("0", 3, shards=[s])
    d.name, d.busy, d.error = "NVIDIA H200", True, "stalled for 30s"
    assert convert.device(d).SerializeToString() == d.SerializeToString()
    n = node("a:1", d)
    n.last_seen = 95.0
    public = convert.node(n, now=100.0)
    assert public.state == cpb.NODE_STATE_UP and public.last_seen_seconds_ago == 5.0 and node_state(public) == "UP"
    p = npb.LoadProgress(stage="reading", bytes_done=1, bytes_total=2, tensors_done=3, tensors_total=4, gb_per_s=1.5)
    assert convert.load_progress(p).SerializeToString() == p.SerializeToString()
    t = npb.ForwardResponse(logits=npb.Tensor(shape=[2], dtype="float32", data=b"\0" * 8))
    assert convert.forward_response(t).SerializeToString() == t.SerializeToString()


def test_enum_names_for_people():
    assert model_state(cpb.ModelInfo(state=cpb.MODEL_STATE_FAILED)) == "FAILED"
    assert node_state(cpb.Node(state=cpb.NODE_STATE_DOWN)) == "DOWN"
    assert model_state(cpb.ModelInfo(state=42)) == "42"  # a state newer than these stubs


def test_a_node_shard_summary_reaches_the_public_one_field_for_field():
    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.neuron.v1 import neuron_pb2 as npb
    from cortex.api.convert import shard_summary

    public_fields = set(cpb.ShardSummary.DESCRIPTOR.fields_by_name)
    assert public_fields <= set(npb.ShardSummary.DESCRIPTOR.fields_by_name)
    node = npb.ShardSummary(handle=3, model="m", running=2, kv_tokens=4096, prefix_cache_hits=16,
                            cuda_graph_batch_sizes=[1, 2, 4], cuda_graph_seconds=0.3, cuda_graph_pool_bytes=1 << 28,
                            warm_up_seconds=0.05, cuda_graph_mixed_batch_sizes=[1, 2], cuda_graph_mixed_chunk=128)
    public = shard_summary(node)
    for name in public_fields:
        assert getattr(public, name) == getattr(node, name), name
    assert list(public.cuda_graph_batch_sizes) == [1, 2, 4]
    assert list(public.cuda_graph_mixed_batch_sizes) == [1, 2] and public.cuda_graph_mixed_chunk == 128
