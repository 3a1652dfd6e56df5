"""Continuous batching through real neuron processes on CPU fp32: requests that run together give
exactly the tokens (and logits) each gives alone, TP included; the waiting bound refuses a flood
without losing an accepted request; a caller that leaves while queued never stops the device."""
from __future__ import annotations

import concurrent.futures
import json
import time

import grpc
import numpy as np
import pytest

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from neuron.server import logits_from_tensor
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE, start_neuron
from tests.integration.test_tensor_parallel import destroy, form_group

POOL = concurrent.futures.ThreadPoolExecutor(16)
# Small turns, so prompts are prefilled in chunks beside other requests' decodes.
ENGINE = ["--max-batched-tokens", "24"]


@pytest.fixture(scope="module")
def one():
    srv = start_neuron(devices="cpu:0,cpu:1", model_roots=[MODELS], extra=ENGINE)
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.fixture(scope="module")
def other():
    srv = start_neuron(devices="cpu:0", model_roots=[MODELS], extra=ENGINE)
    yield srv
    srv.kill()


def batch_reference(name: str) -> list[tuple[list[int], list[int]]]:
    ref = np.load(REFERENCE / f"{name}_batch.npz")
    prompts = np.split(ref["prompt_ids"], np.cumsum(ref["prompt_lengths"])[:-1])
    main = np.load(REFERENCE / f"{name}.npz")
    cases = [(p.tolist(), g.tolist()) for p, g in zip(prompts, ref["greedy_ids"])]
    return cases + [(main["prompt_ids"].tolist(), main["greedy_ids"].tolist())]


def greedy(stub, handle: int, prompt: list[int], n: int = 32, delay: float = 0.0, **extra) -> list[int]:
    time.sleep(delay)
    chunks = stub.Generate(pb.GenerateRequest(handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=prompt)),
                                              sampling=pb.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                                                         **extra)), timeout=120)
    return [t for c in chunks for t in c.token_ids]


def assert_concurrent_greedy_matches_alone(stub, handle: int, name: str) -> None:
    cases = batch_reference(name)
    # Arrivals spread over the first turns: later requests join a batch that is already decoding.
    # More tokens than the 32 of the reference keep them running long enough for Describe to see it.
    calls = [POOL.submit(greedy, stub, handle, prompt, 160, 0.01 * (i % 4)) for i, (prompt, _) in enumerate(cases)]
    most_running = 0
    while not all(c.done() for c in calls):
        shards = [s for d in stub.Describe(pb.DescribeRequest()).devices for s in d.shards if s.handle == handle]
        most_running = max([most_running] + [s.running for s in shards])
        time.sleep(0.005)
    assert most_running >= 2, "the requests never ran in the same turn"
    for (prompt, expected), call in zip(cases, calls):
        assert call.result(timeout=120)[:32] == expected, f"prompt of {len(prompt)} tokens"


def load(stub, name: str, device: str = "cpu:0") -> pb.ShardInfo:
    return list(stub.LoadShard(pb.LoadShardRequest(path=name, model=name, device=device), timeout=60))[-1].loaded


def assert_concurrent_greedy_matches_alone_on(server, name: str) -> None:
    """The fixture loaded on `server`'s cpu:0, checked, dropped."""
    with server.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        info = load(stub, name)
        try:
            assert_concurrent_greedy_matches_alone(stub, info.handle, name)
        finally:
            stub.DropShard(pb.DropShardRequest(handle=info.handle))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_concurrent_greedy_requests_each_give_the_tokens_of_their_prompt_alone(one, name):
    assert_concurrent_greedy_matches_alone_on(one, name)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_concurrent_greedy_with_tp2_on_one_neuron(one, name):
    with one.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        ranks = [(stub, one.address, "cpu:0"), (stub, one.address, "cpu:1")]
        group_id, handles = form_group(ranks, name)
        try:
            assert_concurrent_greedy_matches_alone(stub, handles[0], name)
        finally:
            destroy(ranks, group_id)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_concurrent_greedy_with_tp2_over_two_neuron_processes(one, other, name):
    with one.channel() as ca, other.channel() as cb:
        sa, sb = neuron_pb2_grpc.NeuronStub(ca), neuron_pb2_grpc.NeuronStub(cb)
        ranks = [(sa, one.address, "cpu:0"), (sb, other.address, "cpu:0")]
        group_id, handles = form_group(ranks, name)
        try:
            assert_concurrent_greedy_matches_alone(sa, handles[0], name)
        finally:
            destroy(ranks, group_id)


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["llama2", "qwen2"])
def test_forward_logits_while_other_requests_run_equal_the_unbatched_ones(one, name):
    ref = np.load(REFERENCE / f"{name}.npz")
    prompt, long_prompt = ref["prompt_ids"].tolist(), ref["long_prompt_ids"].tolist()
    with one.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        info = load(stub, name)
        try:
            def forward(ids, all_positions):
                reply = stub.Forward(pb.ForwardRequest(handle=info.handle, token_ids=ids, all_positions=all_positions))
                return logits_from_tensor(reply.logits)
            alone_all, alone_long = forward(prompt, True), forward(long_prompt, False)
            busy = [POOL.submit(greedy, stub, info.handle, p, 160) for p, _ in batch_reference(name)]
            time.sleep(0.05)
            batched = [POOL.submit(forward, prompt, True), POOL.submit(forward, long_prompt, False)]
            batched_all, batched_long = (f.result(timeout=60) for f in batched)
            assert not all(b.done() for b in busy)  # the Forwards ran beside the Generates
            for (_, expected), call in zip(batch_reference(name), busy):
                assert call.result(timeout=120)[:32] == expected
            assert rel_l2(batched_all, alone_all) < 1e-5 and rel_l2(batched_long, alone_long) < 1e-5
            assert rel_l2(batched_all, ref["logits_all"]) < 1e-4 and rel_l2(batched_long, ref["long_logits_last"]) < 1e-4
        finally:
            stub.DropShard(pb.DropShardRequest(handle=info.handle))


def test_a_flood_beyond_the_waiting_bound_is_refused_and_every_accepted_request_completes():
    srv = start_neuron(devices="cpu:0", model_roots=[MODELS], extra=["--max-seqs", "2", "--max-waiting", "3"])
    try:
        with srv.channel() as channel:
            stub = neuron_pb2_grpc.NeuronStub(channel)
            info = load(stub, "llama2")
            ref = np.load(REFERENCE / "llama2.npz")
            prompt, expected = ref["prompt_ids"].tolist(), ref["greedy_ids"].tolist()
            # Long generations, so the first ones still run when the last ones arrive.
            calls = [POOL.submit(greedy, stub, info.handle, prompt, 200) for _ in range(16)]
            served, refused = 0, []
            for call in calls:
                try:
                    tokens = call.result(timeout=120)
                    assert len(tokens) == 200 and tokens[:32] == expected
                    served += 1
                except grpc.RpcError as err:
                    refused.append(err)
            assert refused and served >= 3  # at least the 3 that may wait to start
            for err in refused:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting" in err.details()
            shard = stub.Describe(pb.DescribeRequest()).devices[0].shards[0]
            assert (shard.running, shard.waiting, shard.kv_blocks_used) == (0, 0, 0)
            assert greedy(stub, info.handle, prompt) == expected
    finally:
        srv.kill()


@pytest.fixture
def long_root(tmp_path):
    """llama2 with a long context, so one generation runs for seconds."""
    target = tmp_path / "long"
    target.mkdir()
    for f in (MODELS / "llama2").iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (target / "config.json").write_text(json.dumps(config))
    return tmp_path


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_callers_that_leave_while_queued_do_not_stop_the_device(long_root):
    """Issue 16 #1: a Generate cancelled and a Forward expired while waiting for a running slot."""
    srv = start_neuron(devices="cpu:0", model_roots=[long_root], extra=["--max-seqs", "1"])
    try:
        with srv.channel() as channel:
            stub = neuron_pb2_grpc.NeuronStub(channel)
            info = list(stub.LoadShard(pb.LoadShardRequest(path="long", max_context=4096), timeout=60))[-1].loaded

            def shard():
                return stub.Describe(pb.DescribeRequest()).devices[0].shards[0]

            running = stub.Generate(pb.GenerateRequest(handle=info.handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 2])),
                                                       sampling=pb.SamplingParams(max_tokens=4000, ignore_eos=True)))
            next(running)
            queued = stub.Generate(pb.GenerateRequest(handle=info.handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 3])),
                                                      sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True)))
            wait_for(lambda: shard().waiting == 1, "the second Generate to queue")
            queued.cancel()
            wait_for(lambda: shard().waiting == 0, "the cancelled Generate to leave the queue")
            with pytest.raises(grpc.RpcError) as expired:
                stub.Forward(pb.ForwardRequest(handle=info.handle, token_ids=[1, 2, 3]), timeout=0.3)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda: shard().waiting == 0, "the expired Forward to leave the queue")
            assert shard().running == 1
            running.cancel()
            wait_for(lambda: shard().running == 0, "the running Generate to be aborted")
            ref = np.load(REFERENCE / "llama2.npz")
            for _ in range(2):
                assert greedy(stub, info.handle, ref["prompt_ids"].tolist()) == ref["greedy_ids"].tolist()
        assert srv.terminate() == 0, srv.log()
    finally:
        srv.kill()


def test_a_follower_that_fails_fails_the_leaders_requests_at_once(one, other):
    """The follower rank's shard dropped under a running stream: the leader's requests end
    UNAVAILABLE well inside the 10 s step deadline, and the leader reports its shard failed."""
    with one.channel() as ca, other.channel() as cb:
        sa, sb = neuron_pb2_grpc.NeuronStub(ca), neuron_pb2_grpc.NeuronStub(cb)
        ranks = [(sa, one.address, "cpu:0"), (sb, other.address, "cpu:0")]
        group_id, handles = form_group(ranks, "llama2", step_timeout_ms=10_000)
        try:
            streams = [sa.Generate(pb.GenerateRequest(
                handle=handles[0], prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 2 + i, 3])),
                sampling=pb.SamplingParams(max_tokens=240, ignore_eos=True)), timeout=60) for i in range(3)]
            for stream in streams:
                next(stream)
            sb.DropShard(pb.DropShardRequest(handle=handles[1]))
            dropped_at = time.monotonic()
            for stream in streams:
                with pytest.raises(grpc.RpcError) as err:
                    for _ in stream:
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "group" in err.value.details()
            assert time.monotonic() - dropped_at < 5
            shards = [s for d in sa.Describe(pb.DescribeRequest()).devices for s in d.shards if s.handle == handles[0]]
            assert [s.error != "" for s in shards] == [True]
        finally:
            destroy(ranks, group_id)


def test_prefix_caching_can_be_turned_off():
    srv = start_neuron(devices="cpu:0", model_roots=[MODELS], env={"NEURON_PREFIX_CACHING": "0"})
    try:
        with srv.channel() as channel:
            stub = neuron_pb2_grpc.NeuronStub(channel)
            info = load(stub, "llama2")
            prompt = list(range(5, 45))  # two full blocks
            assert greedy(stub, info.handle, prompt, 4) == greedy(stub, info.handle, prompt, 4)
            shard = stub.Describe(pb.DescribeRequest()).devices[0].shards[0]
            assert shard.prefix_cache_hits == 0
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def one_turn_at_a_time():
    srv = start_neuron(devices="cpu:0", model_roots=[MODELS], extra=ENGINE + ["--no-async-scheduling"])
    yield srv
    assert srv.terminate() == 0, srv.log()


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_concurrent_greedy_without_async_scheduling_give_the_tokens_of_their_prompt_alone(one_turn_at_a_time, name):
    """The default neurons above plan decode turns ahead; this one runs one turn at a time."""
    assert_concurrent_greedy_matches_alone_on(one_turn_at_a_time, name)
    assert '"async_scheduling": false' in one_turn_at_a_time.log()   # the flag reached the engine
