"""What a real neuron's Generate stream returns at the end of an output: the finish reason when the
context runs out, exact usage after a stop string, and the request id."""
from __future__ import annotations

import pytest

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from neuron.tokenizer import Tokenizer
from tests.helpers import MODELS, start_neuron

MAX_CONTEXT = 48


@pytest.fixture(scope="module")
def stub():
    server = start_neuron(devices="cpu:0", model_roots=[MODELS], extra=["--cpu-memory-gb", "1"])
    channel = server.channel()
    yield neuron_pb2_grpc.NeuronStub(channel)
    channel.close()
    server.kill()


@pytest.fixture(scope="module")
def handle(stub) -> int:
    loaded = list(stub.LoadShard(pb.LoadShardRequest(path="llama2", max_context=MAX_CONTEXT, max_seqs=1)))
    return loaded[-1].loaded.handle


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(MODELS / "llama2")


def generate(stub, handle, prompt_ids: list[int], request_id: str = "", **sampling) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=prompt_ids)),
                                 sampling=pb.SamplingParams(**sampling), request_id=request_id)
    return list(stub.Generate(request, timeout=60))


PROMPT = [1, 45, 97, 143, 200]


def test_running_out_of_context_says_context(stub, handle):
    prompt = (PROMPT * 10)[:MAX_CONTEXT - 4]
    messages = generate(stub, handle, prompt, max_tokens=20, ignore_eos=True)
    final = messages[-1]
    assert (final.finish_reason, final.stop_reason) == (pb.FINISH_REASON_LENGTH, "context")
    assert final.usage.completion_tokens == 4 == sum(len(m.token_ids) for m in messages)
    # When max_tokens is the smaller limit, it is the reason.
    final = generate(stub, handle, prompt, max_tokens=3, ignore_eos=True)[-1]
    assert (final.finish_reason, final.stop_reason, final.usage.completion_tokens) == (
        pb.FINISH_REASON_LENGTH, "max_tokens", 3)


def test_request_id_comes_back(stub, handle):
    messages = generate(stub, handle, PROMPT, request_id="client-42", max_tokens=4, ignore_eos=True)
    assert [m.request_id for m in messages] == ["client-42"] * len(messages)
    minted = generate(stub, handle, PROMPT, max_tokens=2, ignore_eos=True)
    assert len({m.request_id for m in minted}) == 1 and minted[0].request_id.startswith("neuron-")


def test_usage_after_a_stop_string_is_exact_and_repeatable(stub, handle, tokenizer):
    free = generate(stub, handle, PROMPT, max_tokens=30, ignore_eos=True)
    ids = [t for m in free for t in m.token_ids]
    text = tokenizer.decode(ids)
    # A stop string from the middle of the greedy output, and the token that completes it.
    stop = next(text[i:i + 3] for i in range(len(text) // 3, len(text)) if text[i:i + 3].strip() == text[i:i + 3])
    completing = next(k for k in range(len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    assert completing < len(ids), "the stop string must leave tokens after it for this test"
    for _ in range(3):
        messages = generate(stub, handle, PROMPT, max_tokens=30, ignore_eos=True, stop=[stop])
        final = messages[-1]
        returned = [t for m in messages for t in m.token_ids]
        assert (final.finish_reason, final.stop_reason) == (pb.FINISH_REASON_STOP, f"stop:{stop}")
        assert returned == ids[:completing]
        assert final.usage.completion_tokens == completing
        assert "".join(m.text for m in messages) == text[:text.find(stop)]
        assert 0 < final.timing.time_to_first_token_ms <= final.timing.total_ms
