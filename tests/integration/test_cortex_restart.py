"""A restarted cortex adopts the models still loaded on the neurons: listed READY, served with the
same tokens, unloadable. Real processes on loopback; both neurons are static."""
from __future__ import annotations

import grpc
import pytest

from cortex.client import CortexClient
from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, free_port, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow

POLL = ["--poll-seconds", "0.3"]


def shards(address: str) -> list[npb.ShardSummary]:
    with grpc.insecure_channel(address) as channel:
        reply = neuron_pb2_grpc.NeuronStub(channel).Describe(npb.DescribeRequest(), timeout=5)
    return [s for d in reply.devices for s in d.shards]


def generate(client: CortexClient, name: str) -> list[int]:
    return [t for c in client.generate(name, token_ids=[1, 5, 9], max_tokens=6, temperature=0.0, ignore_eos=True,
                                       timeout=30) for t in c.token_ids]


def test_a_restarted_cortex_adopts_the_models_left_on_the_neurons():
    a, b = start_neuron("cpu:0", [MODELS]), start_neuron("cpu:0", [MODELS])
    port = free_port()
    cortex = start_cortex([a.address, b.address], extra=POLL, listen=f"127.0.0.1:{port}")
    try:
        with CortexClient(cortex.address, timeout=30) as client:
            wait_until(lambda: all(n.state == cpb.NODE_STATE_UP for n in client.nodes()), what="both neurons UP")
            single = client.load("llama3", name="single", node=b.address)
            pair = client.load("llama2", name="pair", tp=2, timeout=60)
            assert {p.node for p in pair.placement} == {a.address, b.address}
            before = {"single": generate(client, "single"), "pair": generate(client, "pair")}

        cortex.kill()  # SIGKILL: nothing is unloaded
        cortex = start_cortex([a.address, b.address], extra=POLL, listen=f"127.0.0.1:{port}")
        with CortexClient(cortex.address, timeout=30) as client:
            def adopted():
                models = {m.name: m for m in client.models()}
                return set(models) == {"single", "pair"} and all(
                    m.state == cpb.MODEL_STATE_READY for m in models.values()) and models
            models = wait_until(adopted, timeout=5, what="both models adopted READY")
            for old, new in ((single, models["single"]), (pair, models["pair"])):
                # The path as the neurons resolved it (the load named it relative to a model root).
                assert new.tp == old.tp and new.path == str(MODELS / old.path) and new.dtype == old.dtype
                assert new.architecture == old.architecture and new.max_context == old.max_context
                assert new.vocab_size == old.vocab_size and new.weight_bytes == old.weight_bytes
                assert [(p.rank, p.node, p.device, p.handle) for p in new.placement] == \
                       [(p.rank, p.node, p.device, p.handle) for p in old.placement]
                assert "adopted from the neurons after a cortex restart" in new.estimate
            assert {"single": generate(client, "single"), "pair": generate(client, "pair")} == before
            assert client.forward("single", [1, 2]).shape == (single.vocab_size,)

            assert client.unload("single") > 0 and client.unload("pair") > 0
            assert shards(a.address) == [] and shards(b.address) == []
            assert client.models() == []
            # Nothing left to adopt: the names stay free and can be loaded again.
            again = client.load("llama3", name="single")
            assert again.state == cpb.MODEL_STATE_READY and generate(client, "single") == before["single"]
            client.unload("single")
    finally:
        for server in (cortex, a, b):
            server.kill()
