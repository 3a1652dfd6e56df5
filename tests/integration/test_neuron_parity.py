"""Every fixture through a real neuron process: logits and greedy tokens match transformers."""
from __future__ import annotations

import numpy as np
import pytest

from neuron.server import logits_from_tensor
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE, start_neuron


@pytest.fixture(scope="module")
def neuron():
    server = start_neuron(devices="cpu:0,cpu:1", model_roots=[MODELS])
    channel = server.channel()
    yield neuron_pb2_grpc.NeuronStub(channel)
    channel.close()
    assert server.terminate() == 0, server.log()


def load(stub, name: str, **kwargs) -> pb.ShardInfo:
    events = list(stub.LoadShard(pb.LoadShardRequest(path=name, model=name, **kwargs), timeout=60))
    assert events[-1].HasField("loaded")
    return events[-1].loaded


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_and_greedy_tokens_match_transformers(neuron, name):
    ref = np.load(REFERENCE / f"{name}.npz")
    info = load(neuron, name)
    assert info.dtype == "float32"
    try:
        prompt = [int(t) for t in ref["prompt_ids"]]
        last = logits_from_tensor(neuron.Forward(pb.ForwardRequest(handle=info.handle, token_ids=prompt)).logits)
        assert last.shape == (info.vocab_size,)
        assert rel_l2(last, ref["logits_last"]) < 1e-4

        every = neuron.Forward(pb.ForwardRequest(handle=info.handle, token_ids=prompt, all_positions=True)).logits
        assert rel_l2(logits_from_tensor(every), ref["logits_all"]) < 1e-4

        long_prompt = [int(t) for t in ref["long_prompt_ids"]]
        long_last = logits_from_tensor(neuron.Forward(pb.ForwardRequest(handle=info.handle, token_ids=long_prompt)).logits)
        assert rel_l2(long_last, ref["long_logits_last"]) < 1e-4

        request = pb.GenerateRequest(
            handle=info.handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=prompt)),
            sampling=pb.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
        chunks = list(neuron.Generate(request, timeout=60))
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == [int(t) for t in ref["greedy_ids"]]
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert chunks[-1].usage.prompt_tokens == len(prompt)
        assert chunks[-1].usage.completion_tokens == 32
    finally:
        neuron.DropShard(pb.DropShardRequest(handle=info.handle))
