"""The model table's states and routes without a fleet (cortex/models.py): READY, UNAVAILABLE while
a rank's node is down, FAILED (final) when a node no longer holds its shard or reports it failed;
request validation; and adoption of the shards a restarted cortex finds on the neurons."""
from __future__ import annotations

import asyncio

import pytest

from common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from common.proto.cortex.v1 import cortex_pb2 as cpb
from cortex.models import FAILED, LOADING, READY, UNAVAILABLE, LoadSpec, Model, ModelTable, Rank
from cortex.placement import Placer
from cortex.registry import Registry
from tests.unit.cortex_fakes import Clock, FakeFleet, device, shard


def in_loop(test):
    """Run the test body inside an event loop (a Model's outcome is an asyncio future)."""
    def wrapper(*args, **kwargs):
        async def body():
            return test(*args, **kwargs)
        return asyncio.run(body())
    wrapper.__name__ = test.__name__
    return wrapper


def fleet(**devices_by_node):
    """A registry whose nodes (static, UP, described at t=10) hold the given devices."""
    fake, clock = FakeFleet(), Clock(10.0)
    registry = Registry(list(devices_by_node), clock=clock, connect=fake)
    for address, devices in devices_by_node.items():
        n = registry.get(address)
        n.devices, n.up, n.reason, n.described_at = list(devices), True, "", 10.0
    return registry, ModelTable(registry, Placer())


def ready_model(table: ModelTable, name: str, *ranks: Rank, ready_at: float = 5.0) -> Model:
    model = Model(LoadSpec(name, "/m", "", len(ranks), 0, 0, "", ""), READY, ready_at=ready_at)
    model.ranks = list(ranks)
    model.done.set_result(None)
    table._models[name] = model
    return model


@in_loop
def test_a_model_is_ready_while_its_nodes_are_up_and_hold_its_shards():
    registry, table = fleet(**{"a:1": [device("0", 10, shards=[shard(11)])]})
    model = ready_model(table, "m", Rank(0, "a:1", "0", 11))
    assert table.state_of(model) == (READY, "")
    route = table.route("m")
    assert (route.node, route.handle) == ("a:1", 11)
    (info,) = table.list()
    assert info.state == cpb.MODEL_STATE_READY and [p.handle for p in info.placement] == [11]


@in_loop
def test_a_model_is_unavailable_while_a_node_is_down_and_ready_when_it_is_back():
    registry, table = fleet(**{"a:1": [device("0", 10, shards=[shard(11)])], "b:1": [device("0", 10, shards=[shard(12)])]})
    model = ready_model(table, "m", Rank(0, "a:1", "0", 11), Rank(1, "b:1", "0", 12))
    b = registry.get("b:1")
    b.up, b.reason = False, "missed 3 health polls"
    assert table.state_of(model) == (UNAVAILABLE, "node b:1 (rank 1) is down: missed 3 health polls")
    with pytest.raises(Unavailable, match="model m is unavailable: node b:1"):
        table.route("m")
    b.up, b.reason = True, ""
    assert table.state_of(model) == (READY, "")


@in_loop
def test_a_model_whose_node_was_forgotten_is_unavailable_and_says_so():
    registry, table = fleet(**{"a:1": [device("0", 10, shards=[shard(11)])]})
    model = ready_model(table, "m", Rank(0, "gone:1", "0", 11))
    state, reason = table.state_of(model)
    assert state == UNAVAILABLE and "no longer in the fleet" in reason


@in_loop
def test_a_shard_gone_from_a_later_describe_fails_the_model_for_good():
    registry, table = fleet(**{"a:1": [device("0", 10)]})
    early = ready_model(table, "early", Rank(0, "a:1", "0", 11), ready_at=20.0)
    assert table.state_of(early) == (READY, ""), "a Describe asked before the load finished proves nothing"
    model = ready_model(table, "m", Rank(0, "a:1", "0", 11), ready_at=5.0)
    state, reason = table.state_of(model)
    assert state == FAILED and "no longer holds rank 0 (shard 11)" in reason
    registry.get("a:1").devices = [device("0", 10, shards=[shard(11)])]
    assert table.state_of(model)[0] == FAILED, "FAILED is final"
    with pytest.raises(FailedPrecondition, match="model m failed: node a:1 no longer holds"):
        table.route("m")


@in_loop
def test_a_rank_that_reports_failure_fails_the_model_even_while_another_node_is_down():
    registry, table = fleet(**{"a:1": [device("0", 10, shards=[shard(11, error="the TP group broke")])],
                               "b:1": [device("0", 10, shards=[shard(12)])]})
    model = ready_model(table, "m", Rank(0, "a:1", "0", 11), Rank(1, "b:1", "0", 12))
    registry.get("b:1").up = False
    state, reason = table.state_of(model)
    assert state == FAILED and reason.startswith("rank 0 on a:1 device 0 failed: the TP group broke")


@in_loop
def test_routes_to_models_that_are_loading_or_unknown_are_refused():
    _, table = fleet(**{"a:1": [device("0", 10)]})
    loading = Model(LoadSpec("l", "/m", "", 1, 0, 0, "", ""))
    table._models["l"] = loading
    assert loading.state == LOADING
    with pytest.raises(Unavailable, match="model l is still loading"):
        table.route("l")
    with pytest.raises(NotFound, match=r"model 'nope' is not loaded \(loaded: l\)"):
        table.route("nope")


@pytest.mark.parametrize("fields, message", [
    ({"name": ""}, "name is empty"),
    ({"name": "-x"}, "is not allowed"),
    ({"path": ""}, "path is empty"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of float32, float16, bfloat16"),
    ({"tp": 65}, "tp 65 is larger than 64"),
])
def test_load_requests_are_checked(fields, message):
    request = cpb.LoadModelRequest(**{"name": "m", "path": "/m", **fields})
    with pytest.raises(InvalidArgument, match=message):
        LoadSpec.from_request(request)


@in_loop
def test_a_second_load_differs_only_in_what_it_asks_for():
    spec = LoadSpec.from_request(cpb.LoadModelRequest(name="m", path="p", tp=0))
    assert spec.tp == 1
    model = Model(spec, READY, dtype="float32", max_context=4096)
    assert model.differences(LoadSpec.from_request(cpb.LoadModelRequest(name="m", path="p"))) == []
    asked = LoadSpec.from_request(cpb.LoadModelRequest(name="m", path="q", dtype="float16", tp=2, max_context=64))
    assert model.differences(asked) == ["path p (asked: q)", "dtype float32 (asked: float16)", "tp 1 (asked: 2)",
                                        "max_context 4096 (asked: 64)"]


@in_loop
def test_shards_no_model_holds_are_adopted_as_ready_models():
    tp = dict(tp_size=2, group_id="pair-1", path="/ckpt/pair", architecture="LlamaForCausalLM", max_context=64)
    registry, table = fleet(**{
        "a:1": [device("0", 10, shards=[shard(11, model="single", path="/ckpt/s", dtype="float32")]),
                device("1", 10, shards=[shard(22, model="pair", tp_rank=1, **tp)])],
        "b:1": [device("0", 10, shards=[shard(21, model="pair", tp_rank=0, **tp),
                                         shard(31, model="half", tp_rank=0, tp_size=2, group_id="half-1"),
                                         shard(41, model="held"), shard(51, model="bad name!")])]})
    ready_model(table, "held", Rank(0, "b:1", "0", 41))
    table.adopt()
    assert sorted(table._models) == ["held", "pair", "single"], "an incomplete group and a bad name stay out"
    single, pair = table.get("single"), table.get("pair")
    assert (single.spec.path, single.dtype, single.state) == ("/ckpt/s", "float32", READY)
    assert [(r.rank, r.node, r.device, r.handle) for r in pair.ranks] == [(0, "b:1", "0", 21), (1, "a:1", "1", 22)]
    assert pair.group_id == "pair-1" and pair.spec.tp == 2 and table.state_of(pair) == (READY, "")
    assert table.info(pair).estimate == "adopted from the neurons after a cortex restart"


@in_loop
def test_nothing_is_adopted_while_a_release_runs_or_from_a_describe_older_than_it():
    registry, table = fleet(**{"a:1": [device("0", 10, shards=[shard(11, model="x")])]})
    table._releasing = 1
    table.adopt()
    assert "x" not in table._models
    table._releasing, table._released_at = 0, 20.0  # the last Describe (t=10) predates the release
    table.adopt()
    assert "x" not in table._models
    registry.get("a:1").pending_drops.add(11)  # a deferred drop is not an orphan either
    table._released_at = 0.0
    table.adopt()
    assert "x" not in table._models
    registry.get("a:1").pending_drops.clear()
    table.adopt()
    assert table.get("x").state == READY
