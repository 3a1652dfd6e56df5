"""The registry's state changes without a network: UP/DOWN from polls and heartbeats, the reasons,
deferred drops, and the expiry of registered nodes that stay down (cortex/registry.py). The
neurons are FakeNeurons and time is a Clock the test moves."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from common.errors import FailedPrecondition, InvalidArgument
from cortex.registry import DOWN_EXPIRY_SECONDS, MISSED_POLLS_DOWN, Registry
from tests.unit.cortex_fakes import Clock, FakeFleet, FakeNeuron, device, rpc_error, shard

REFUSED = "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:1: Connection refused"


def registry(static=(), **kwargs) -> tuple[Registry, FakeFleet, Clock]:
    fleet, clock = FakeFleet(), Clock()
    return Registry(list(static), poll_seconds=2.0, heartbeat_timeout=6.0, clock=clock, connect=fleet,
                    **kwargs), fleet, clock


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_static_node_is_down_until_its_first_answer_then_up():
    reg, fleet, _ = registry(["a:1"])
    (node,) = reg.nodes()
    assert (node.up, node.reason, node.source) == (False, "not reached yet", "static")
    fleet.neurons["a:1"].devices = [device("0", 10)]
    run(reg.poll(node))
    assert node.up and node.reason == "" and [d.id for d in node.devices] == ["0"] and reg.up_nodes() == [node]


def test_a_node_that_never_answered_says_why():
    reg, fleet, _ = registry(["a:1"])
    fleet.neurons["a:1"].error = rpc_error(grpc.StatusCode.UNAVAILABLE, REFUSED)
    node = reg.get("a:1")
    run(reg.poll(node))
    assert not node.up and node.reason == f"not reached yet: UNAVAILABLE: {REFUSED}"
    # It is asked without wait_for_ready, so the connection's own error comes back, not a deadline.
    assert fleet.neurons["a:1"].describe_calls[-1]["wait_for_ready"] is False


def test_a_node_that_answered_is_down_after_missed_polls_and_up_again_when_it_answers():
    reg, fleet, _ = registry(["a:1"])
    node, neuron = reg.get("a:1"), fleet.neurons["a:1"]
    run(reg.poll(node))
    neuron.error = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    for _ in range(MISSED_POLLS_DOWN - 1):
        run(reg.poll(node))
        assert node.up, "a missed poll or two is not down yet"
    run(reg.poll(node))
    assert not node.up and node.reason == (f"missed {MISSED_POLLS_DOWN} health polls in a row (every 2s); "
                                           "last error: DEADLINE_EXCEEDED: Deadline Exceeded")
    # Reconnecting, it gets the whole deadline.
    assert neuron.describe_calls[-1]["wait_for_ready"] is True
    neuron.error = None
    run(reg.poll(node))
    assert node.up and node.missed_polls == 0


def test_a_registered_node_is_down_without_heartbeats_and_up_with_one():
    reg, fleet, clock = registry()
    node = run(reg.register("b:2", "host-b", "1.0"))
    assert node.up and node.source == "registered" and (node.host, node.version) == ("h", "v")
    clock.advance(6.5)
    run(reg.poll(node))  # it still answers polls, but its heartbeats stopped
    assert not node.up and node.reason == "no heartbeat for 6.5s (timeout 6s)"
    assert reg.heartbeat("b:2") is True
    assert node.up
    assert reg.heartbeat("nobody:1") is False, "an unknown neuron is asked to register"
    assert reg.heartbeat_interval == 2.0


def test_a_static_node_that_never_registered_is_asked_to():
    reg, _, _ = registry(["a:1"])
    assert reg.heartbeat("a:1") is False


def test_addresses_must_be_host_and_port():
    with pytest.raises(InvalidArgument, match="--neuron 'no-port' is not HOST:PORT"):
        registry(["no-port"])
    reg, _, _ = registry()
    with pytest.raises(InvalidArgument, match="address 'x:0' is not HOST:PORT"):
        run(reg.register("x:0", "", ""))


def test_registered_nodes_that_stay_down_expire_static_ones_do_not():
    reg, fleet, clock = registry(["s:1"])
    run(reg.register("r:1", "", ""))
    for address in ("s:1", "r:1"):
        fleet.neurons[address].error = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    clock.advance(7)  # r's heartbeats stopped: DOWN from here
    run(reg.poll_all())
    assert not reg.get("r:1").up and not reg.get("s:1").up
    clock.advance(DOWN_EXPIRY_SECONDS - 1)
    assert run(reg.expire()) == []
    clock.advance(1)
    assert run(reg.expire()) == ["r:1"]
    assert [n.address for n in reg.nodes()] == ["s:1"]
    # Back again, it simply registers.
    fleet.neurons["r:1"].error = None
    run(reg.register("r:1", "", ""))
    assert reg.get("r:1").up


def test_a_node_that_comes_back_before_the_expiry_starts_the_count_again():
    reg, fleet, clock = registry(down_expiry=100)
    run(reg.register("r:1", "", ""))
    clock.advance(7)
    run(reg.poll_all())
    clock.advance(90)
    reg.heartbeat("r:1")  # UP again
    clock.advance(7)
    run(reg.poll_all())   # DOWN again, 97 s after it first went down
    clock.advance(50)
    assert run(reg.expire()) == []
    clock.advance(50)
    assert run(reg.expire()) == ["r:1"]


def test_no_expiry_when_it_is_zero():
    reg, _, clock = registry(down_expiry=0)
    run(reg.register("r:1", "", ""))
    clock.advance(10 * DOWN_EXPIRY_SECONDS)
    run(reg.poll_all())
    assert run(reg.expire()) == [] and reg.get("r:1") is not None


def test_a_drop_that_failed_is_done_when_the_node_answers_again():
    reg, fleet, _ = registry(["a:1"])
    neuron = fleet.neurons["a:1"]
    neuron.devices = [device("0", 10, shards=[shard(5), shard(6)])]
    node = reg.get("a:1")
    reg.schedule_drop("a:1", 5)
    reg.schedule_drop("a:1", 99)  # no longer on the node (it restarted): forgotten, not dropped
    run(reg.poll(node))
    assert neuron.dropped == [5] and node.pending_drops == set()


def test_a_registration_is_kept_only_once_the_address_answers_as_that_neuron():
    reg, fleet, _ = registry()
    fleet.neurons["c:3"] = FakeNeuron(device("0", 10), address="10.9.9.9:1")  # another server answers there
    fleet.neurons["d:4"] = FakeNeuron(device("0", 10), address="d:4")
    fleet.neurons["d:4"].error = rpc_error(grpc.StatusCode.UNAUTHENTICATED, "send the cluster token")
    for address, why in (("c:3", "says it is '10.9.9.9:1'"), ("d:4", "UNAUTHENTICATED (send the cluster token)")):
        with pytest.raises(FailedPrecondition) as err:
            run(reg.register(address, "fake", "0"))
        assert why in err.value.message
    assert reg.nodes() == [], "a refused registration leaves nothing behind"
    fleet.neurons["d:4"].error = None
    assert run(reg.register("d:4", "real", "1")).up and [n.address for n in reg.nodes()] == ["d:4"]
