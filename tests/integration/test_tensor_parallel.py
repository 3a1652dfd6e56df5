"""Tensor parallelism on CPU devices, driven through the neuron API the way cortex drives it:
TP=2/4 over cpu:N of one neuron and TP=2 over two neuron processes match TP=1; failures are clean."""
from __future__ import annotations

import concurrent.futures
import time
import uuid

import grpc
import numpy as np
import pytest

from neuron.server import logits_from_tensor
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE, start_neuron

POOL = concurrent.futures.ThreadPoolExecutor(8)


@pytest.fixture(scope="module")
def four():
    srv = start_neuron(devices="cpu:0,cpu:1,cpu:2,cpu:3", model_roots=[MODELS])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def pair():
    a, b = start_neuron(devices="cpu:0", model_roots=[MODELS]), start_neuron(devices="cpu:0", model_roots=[MODELS])
    yield a, b
    a.kill()
    b.kill()


def form_group(ranks: list[tuple[object, str, str]], path: str, timeout_ms: int = 10_000,
               step_timeout_ms: int = 10_000) -> tuple[str, list[int]]:
    """ranks: (stub, neuron address, device) per rank. Returns the group id and each rank's handle."""
    group_id = uuid.uuid4().hex[:12]
    stub0, _, device0 = ranks[0]
    uid = stub0.CreateGroupId(pb.CreateGroupIdRequest(device=device0)).unique_id
    members = [pb.GroupMember(address=address, device=device) for _, address, device in ranks]
    joins = [POOL.submit(stub.InitGroup, pb.InitGroupRequest(
        group_id=group_id, world_size=len(ranks), rank=r, unique_id=uid, device=device, timeout_ms=timeout_ms,
        members=members, step_timeout_ms=step_timeout_ms)) for r, (stub, _, device) in enumerate(ranks)]
    for j in joins:
        j.result(timeout=30)
    sums = [POOL.submit(stub.GroupSanity, pb.GroupSanityRequest(group_id=group_id)) for stub, _, _ in ranks]
    assert all(s.result(timeout=30).value == len(ranks) for s in sums)
    loads = [POOL.submit(lambda s=stub, r=r, d=device: list(s.LoadShard(pb.LoadShardRequest(
        path=path, device=d, tp=pb.TensorParallel(group_id=group_id, rank=r, size=len(ranks)))))[-1].loaded)
        for r, (stub, _, device) in enumerate(ranks)]
    try:
        return group_id, [load.result(timeout=60).handle for load in loads]
    except grpc.RpcError:
        destroy(ranks, group_id)  # as cortex does: any rank failing releases every rank
        raise


def destroy(ranks, group_id):
    for stub in {id(s): s for s, _, _ in ranks}.values():
        stub.DestroyGroup(pb.DestroyGroupRequest(group_id=group_id))


def greedy(stub, handle, prompt, n=32):
    chunks = stub.Generate(pb.GenerateRequest(handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=prompt)),
                                              sampling=pb.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)),
                           timeout=60)
    return [t for c in chunks for t in c.token_ids]


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tp1(stub, name):
    info = list(stub.LoadShard(pb.LoadShardRequest(path=name, device="cpu:0")))[-1].loaded
    ref = np.load(REFERENCE / f"{name}.npz")
    prompt = ref["prompt_ids"].tolist()
    logits = logits_from_tensor(stub.Forward(pb.ForwardRequest(handle=info.handle, token_ids=prompt, all_positions=True)).logits)
    tokens = greedy(stub, info.handle, prompt)
    stub.DropShard(pb.DropShardRequest(handle=info.handle))
    return prompt, logits, tokens


def assert_tp_matches_tp1(leader_stub, ranks, name):
    """Logits within relative L2 1e-5 of TP=1 and identical greedy tokens; nothing left after."""
    prompt, logits1, tokens1 = tp1(leader_stub, name)
    group_id, handles = form_group(ranks, name)
    try:
        logits = logits_from_tensor(leader_stub.Forward(pb.ForwardRequest(handle=handles[0], token_ids=prompt,
                                                                          all_positions=True)).logits)
        assert rel_l2(logits, logits1) < 1e-5
        assert greedy(leader_stub, handles[0], prompt) == tokens1
    finally:
        destroy(ranks, group_id)
    for stub in {id(s): s for s, _, _ in ranks}.values():
        assert not any(d.shards for d in stub.Describe(pb.DescribeRequest()).devices)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tp_on_one_neuron_matches_tp1(four, name, size):
    with four.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        assert_tp_matches_tp1(stub, [(stub, four.address, f"cpu:{r}") for r in range(size)], name)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tp2_across_two_neuron_processes_matches_tp1(pair, name):
    a, b = pair
    with a.channel() as ca, b.channel() as cb:
        sa, sb = neuron_pb2_grpc.NeuronStub(ca), neuron_pb2_grpc.NeuronStub(cb)
        assert_tp_matches_tp1(sa, [(sa, a.address, "cpu:0"), (sb, b.address, "cpu:0")], name)


def test_unshardable_config_is_refused_with_the_reason(four):
    with four.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        ranks = [(stub, four.address, f"cpu:{r}") for r in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            form_group(ranks, "llama2")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not divisible by 3" in err.value.details()
        assert not any(d.shards for d in stub.Describe(pb.DescribeRequest()).devices)
        group_id, _ = form_group(ranks[:2], "llama2")  # the devices were released
        destroy(ranks[:2], group_id)


def test_a_rank_that_never_joins_times_out_and_leaves_nothing(four):
    with four.channel() as channel:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        uid = stub.CreateGroupId(pb.CreateGroupIdRequest(device="cpu:0")).unique_id
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            members = [pb.GroupMember(address=four.address, device=f"cpu:{r}") for r in range(2)]
            stub.InitGroup(pb.InitGroupRequest(group_id="lonely", world_size=2, rank=0, unique_id=uid, device="cpu:0",
                                               timeout_ms=1500, members=members))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "[1] did not join" in err.value.details()
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError) as gone:
            stub.GroupSanity(pb.GroupSanityRequest(group_id="lonely"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        # the device is free for a new group
        ranks = [(stub, four.address, "cpu:0"), (stub, four.address, "cpu:1")]
        group_id, _ = form_group(ranks, "llama2")
        destroy(ranks, group_id)


def kill_follower_mid_stream(leader_stub, handle: int, follower, max_tokens: int, within_s: float) -> None:
    """Kill the follower while the leader streams: the stream must end UNAVAILABLE within `within_s`,
    and the leader must report its shard failed (holding no memory)."""
    stream = leader_stub.Generate(pb.GenerateRequest(
        handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 2, 3])),
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True)), timeout=60)
    next(stream)
    follower.kill()
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "group" in err.value.details()
    assert time.monotonic() - killed_at < within_s
    shards = [s for d in leader_stub.Describe(pb.DescribeRequest()).devices for s in d.shards]
    assert [s.error != "" for s in shards] == [True]


def test_killed_follower_ends_the_stream_unavailable_and_the_model_can_be_reloaded():
    leader = start_neuron(devices="cpu:0", model_roots=[MODELS])
    follower = start_neuron(devices="cpu:0", model_roots=[MODELS])
    spare = start_neuron(devices="cpu:0", model_roots=[MODELS])
    try:
        with leader.channel() as cl, follower.channel() as cf, spare.channel() as cs:
            sl, sf, ss = (neuron_pb2_grpc.NeuronStub(c) for c in (cl, cf, cs))
            ranks = [(sl, leader.address, "cpu:0"), (sf, follower.address, "cpu:0")]
            group_id, handles = form_group(ranks, "llama2", step_timeout_ms=3000)
            kill_follower_mid_stream(sl, handles[0], follower, max_tokens=200, within_s=3 + 2)
            with pytest.raises(grpc.RpcError) as again:
                greedy(sl, handles[0], [1, 2])
            assert again.value.code() == grpc.StatusCode.UNAVAILABLE
            destroy(ranks[:1], group_id)
            # load it again, over the leader and a spare neuron
            ranks = [(sl, leader.address, "cpu:0"), (ss, spare.address, "cpu:0")]
            group_id, handles = form_group(ranks, "llama2")
            assert len(greedy(sl, handles[0], [1, 2, 3], n=8)) == 8
            destroy(ranks, group_id)
    finally:
        for srv in (leader, follower, spare):
            srv.kill()
