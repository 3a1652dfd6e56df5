"""Bounds on what a client or a checkpoint controls: KV slots per shard, logits per Forward (neuron
and cortex), prompt bytes on cortex (and cortex's per-model health, `model/<name>`), config sizes checked against the safetensors headers before
anything is sized from them, InitGroup's timeout capped, and CreateGroupId leaving no socket pile."""
from __future__ import annotations

import json
import os
import shutil
import time

import grpc
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from common.proto.cortex.v1 import cortex_pb2_grpc
from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from cortex.client import check_health
from tests.helpers import MODELS, start_cortex, start_neuron, wait_until

LOGIT_LIMIT = 100_000  # llama2's vocabulary is 450: 55 positions of float32 logits fit


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(MODELS / "llama2", root / "llama2")
    huge = shutil.copytree(MODELS / "llama2", root / "million-layers")
    config = json.loads((huge / "config.json").read_text())
    config["num_hidden_layers"] = 1_000_000
    (huge / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def neuron(root):
    srv = start_neuron(model_roots=[root], extra=["--max-logits-bytes", str(LOGIT_LIMIT), "--max-seqs-limit", "8",
                                                  "--max-group-timeout-ms", "1000"])
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(neuron):
    channel = neuron.channel()
    yield neuron_pb2_grpc.NeuronStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def shard(stub):
    return list(stub.LoadShard(pb.LoadShardRequest(path="llama2", model="llama2", max_seqs=2)))[-1].loaded


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    return err.value.code(), err.value.details()


def _peak_rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_max_seqs_past_the_cap_are_refused(stub, shard):
    code, details = _code(lambda: stub.LoadShard(pb.LoadShardRequest(path="llama2", max_seqs=4_294_967_295),
                                                 timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-seqs-limit" in details
    assert not any(s.handle != shard.handle for d in stub.Describe(pb.DescribeRequest()).devices for s in d.shards)


def test_logits_past_the_limit_are_resource_exhausted(stub, shard):
    ids = list(range(1, 101))
    code, details = _code(lambda: stub.Forward(pb.ForwardRequest(handle=shard.handle, token_ids=ids,
                                                                 all_positions=True), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-logits-bytes" in details
    reply = stub.Forward(pb.ForwardRequest(handle=shard.handle, token_ids=ids[:50], all_positions=True), timeout=30)
    assert list(reply.logits.shape) == [50, 450]


def test_a_config_claiming_a_million_layers_is_refused_fast_without_allocating(neuron, stub):
    before = _peak_rss_bytes(neuron.proc.pid)
    code, details = _code(lambda: stub.Inspect(pb.InspectRequest(path="million-layers"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "num_hidden_layers 1000000" in details and "2 layers" in details
    assert _peak_rss_bytes(neuron.proc.pid) - before < 100 << 20


def test_init_group_timeout_is_capped(stub):
    uid = stub.CreateGroupId(pb.CreateGroupIdRequest()).unique_id
    members = [pb.GroupMember(address="127.0.0.1:1", device="cpu")] * 2
    started = time.monotonic()
    code, details = _code(lambda: stub.InitGroup(pb.InitGroupRequest(
        group_id="capped", world_size=2, rank=0, unique_id=uid, members=members, timeout_ms=4_000_000_000),
        timeout=30))
    # The neuron's own deadline (capped to 1 s) ended it, not the client's 30 s.
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "did not join" in details
    assert time.monotonic() - started < 25


def test_a_malformed_group_id_is_invalid_argument(stub):
    uid = b"tcp1 no-port-here".ljust(128, b"\0")
    members = [pb.GroupMember(address="127.0.0.1:1", device="cpu")] * 2
    code, details = _code(lambda: stub.InitGroup(pb.InitGroupRequest(
        group_id="bad", world_size=2, rank=1, unique_id=uid, members=members), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details


def test_create_group_id_does_not_pile_up_listening_sockets(neuron, stub):
    def open_fds():
        return len(os.listdir(f"/proc/{neuron.proc.pid}/fd"))
    before = open_fds()
    refused = 0
    for _ in range(100):
        try:
            stub.CreateGroupId(pb.CreateGroupIdRequest(), timeout=10)
        except grpc.RpcError as err:  # past the cap of open ids: refused, nothing opened
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            refused += 1
    assert refused >= 100 - 16 and open_fds() - before <= 20


@pytest.fixture(scope="module")
def cortex(neuron):
    srv = start_cortex([neuron.address], extra=["--poll-seconds", "0.5", "--max-logits-bytes", str(LOGIT_LIMIT),
                                                "--max-prompt-bytes", "10000"])
    yield srv
    srv.kill()


def _model_health(address: str, name: str) -> str:
    try:
        return check_health(address, service=f"model/{name}")
    except grpc.RpcError as err:
        return err.code().name  # NOT_FOUND: never published


def test_cortex_bounds_logits_and_prompt_bytes(cortex):
    channel = cortex.channel()
    stub = cortex_pb2_grpc.CortexStub(channel)
    wait_until(lambda: any(n.state == cpb.NODE_STATE_UP for n in stub.ListNodes(cpb.ListNodesRequest()).nodes),
               what="the neuron UP")
    list(stub.LoadModel(cpb.LoadModelRequest(name="bounded", path="llama2", kv_slots=2), timeout=60))
    # Per-model health (published after each poll round).
    wait_until(lambda: _model_health(cortex.address, "bounded") == "SERVING", what="model/bounded")
    code, details = _code(lambda: stub.Forward(cpb.ForwardRequest(model="bounded", token_ids=list(range(1, 101)),
                                                                  all_positions=True), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cortex's limit" in details
    code, details = _code(lambda: stub.Generate(cpb.GenerateRequest(model="bounded", prompt=cpb.Prompt(text="x" * 20_000)),
                                                timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cortex's limit" in details
    chunks = list(stub.Generate(cpb.GenerateRequest(model="bounded", prompt=cpb.Prompt(text="hello"),
                                                    sampling=cpb.SamplingParams(max_tokens=2, ignore_eos=True)),
                                timeout=30))
    assert sum(len(c.token_ids) for c in chunks) == 2
    stub.UnloadModel(cpb.UnloadModelRequest(name="bounded"), timeout=30)
    wait_until(lambda: _model_health(cortex.address, "bounded") == "SERVICE_UNKNOWN",
               what="model/bounded gone")
    channel.close()
