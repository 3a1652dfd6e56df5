"""Placement without a fleet: which device(s) a model goes to, what in-flight loads reserve, and the
refusals (cortex/placement.py)."""
from __future__ import annotations

import pytest

from common.errors import InvalidArgument, ResourceExhausted, Unavailable
from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.placement import Estimate, Placer, Target, check_pins, default_slots
from tests.unit.cortex_fakes import GiB, device, node, shard


def estimate(weights_gib: float = 10, kv_gib: float = 1, slots: int = 4, kind: str = "cuda") -> Estimate:
    return Estimate(path="/m", architecture="LlamaForCausalLM", dtype="bfloat16", max_context=4096, vocab_size=100,
                    weight_bytes=int(weights_gib * GiB), kv_bytes_per_slot=int(kv_gib * GiB), workspace_bytes=0,
                    kv_slots=slots, device_kind=kind, inspected="by a test")


def where(targets: list[Target]) -> list[tuple[int, str, str]]:
    return [(t.rank, t.node, t.device) for t in targets]


def test_one_rank_goes_to_the_emptiest_device_of_the_right_kind():
    nodes = [node("a:1", device("0", 20), device("1", 60)), node("b:1", device("0", 40), device("cpu", 500, "cpu"))]
    assert where(Placer().place(nodes, estimate(), tp=1)) == [(0, "a:1", "1")]
    assert where(Placer().place(nodes, estimate(kind="cpu"), tp=1)) == [(0, "b:1", "cpu")]


def test_a_device_needs_room_for_the_weights_and_one_kv_slot_not_all_of_them():
    nodes = [node("a:1", device("0", 11.5))]
    e = estimate(weights_gib=10, kv_gib=1, slots=4)
    assert e.need_bytes == 14 * GiB and e.min_bytes == 11 * GiB
    assert where(Placer().place(nodes, e, tp=1)) == [(0, "a:1", "0")]


def test_down_nodes_and_pins_narrow_the_candidates():
    nodes = [node("a:1", device("0", 70)), node("b:1", device("0", 30), device("1", 50)),
             node("c:1", device("0", 80), up=False)]
    assert where(Placer().place(nodes, estimate(), tp=1)) == [(0, "a:1", "0")]
    assert where(Placer().place(nodes, estimate(), tp=1, pin_node="b:1")) == [(0, "b:1", "1")]
    assert where(Placer().place(nodes, estimate(), tp=1, pin_node="b:1", pin_device="0")) == [(0, "b:1", "0")]


def test_tensor_parallel_prefers_devices_of_one_neuron():
    # b's second-emptiest device (40) beats a's (30), although a has the emptiest device of all.
    nodes = [node("a:1", device("0", 79), device("1", 30)), node("b:1", device("0", 50), device("1", 40))]
    assert where(Placer().place(nodes, estimate(), tp=2)) == [(0, "b:1", "0"), (1, "b:1", "1")]


def test_tensor_parallel_spreads_over_neurons_when_no_one_neuron_has_enough():
    nodes = [node("a:1", device("0", 70), device("1", 5)), node("b:1", device("0", 60)),
             node("c:1", device("0", 65), device("1", 20))]
    # The three emptiest that fit (11 GiB): a/0 70, c/0 65, b/0 60; c/1 (20) too, but it is fourth.
    targets = Placer().place(nodes, estimate(), tp=3)
    assert where(targets) == [(0, "a:1", "0"), (1, "c:1", "0"), (2, "b:1", "0")]
    # With four ranks c's two devices are picked and kept next to each other.
    assert [t.node for t in Placer().place(nodes, estimate(), tp=4)] == ["a:1", "c:1", "c:1", "b:1"]


def test_tensor_parallel_skips_devices_already_in_a_group():
    grouped = device("0", 70, shards=[shard(7, tp_size=2, group_id="g")])
    failed = device("1", 70, shards=[shard(8, error="group broke")])
    nodes = [node("a:1", grouped, failed, device("2", 20), device("3", 15))]
    assert where(Placer().place(nodes, estimate(), tp=2)) == [(0, "a:1", "2"), (1, "a:1", "3")]
    # A single-device load may still share a device with a group.
    assert where(Placer().place(nodes, estimate(), tp=1)) == [(0, "a:1", "0")]


def test_loads_in_flight_reserve_what_they_will_take():
    placer, nodes, e = Placer(), [node("a:1", device("0", 30), device("1", 25))], estimate()
    first = placer.place(nodes, e, tp=1)
    placer.reserve(first, e.need_bytes)  # 14 GiB of device 0: 16 GiB left there, 25 on device 1
    assert where(placer.place(nodes, e, tp=1)) == [(0, "a:1", "1")]
    placer.release(first, e.need_bytes)
    assert where(placer.place(nodes, e, tp=1)) == [(0, "a:1", "0")]
    assert placer.free_bytes(nodes[0], nodes[0].devices[0]) == 30 * GiB


def test_a_tp_load_in_flight_keeps_its_devices_out_of_other_groups():
    placer, nodes = Placer(), [node("a:1", *(device(str(i), 70) for i in range(4)))]
    first = placer.place(nodes, estimate(), tp=2)
    placer.reserve(first, 0)
    assert {t.device for t in placer.place(nodes, estimate(), tp=2)} == {"2", "3"}
    placer.release(first, 0)
    assert not placer.in_group(nodes[0], nodes[0].devices[0])


def test_no_room_is_resource_exhausted_with_the_numbers():
    nodes = [node("a:1", device("0", 8), device("1", 3))]
    with pytest.raises(ResourceExhausted) as err:
        Placer().place(nodes, estimate(), tp=1)
    message = err.value.message
    assert "one device needs 11.00 GiB free" in message and "a:1 device 0: 8.00 GiB" in message
    assert "0 cuda device(s) have that much" in message
    with pytest.raises(ResourceExhausted) as err:
        Placer().place([node("a:1", device("0", 70))], estimate(), tp=2)
    assert "each of 2 devices" in err.value.message and "1 cuda device(s) have that much" in err.value.message


def test_pins_that_name_nothing_are_refused_before_any_work():
    nodes = {"a:1": node("a:1", device("0", 10)), "b:1": node("b:1", up=False)}
    with pytest.raises(InvalidArgument, match="device is set but node is not"):
        check_pins(nodes, "", "0", 1)
    with pytest.raises(InvalidArgument, match="device pins a single device, but tp is 2"):
        check_pins(nodes, "a:1", "0", 2)
    with pytest.raises(InvalidArgument, match=r"node 'c:1' is not in the fleet \(known nodes: a:1, b:1\)"):
        check_pins(nodes, "c:1", "", 1)
    with pytest.raises(Unavailable, match="node b:1 is down: missed 3 health polls"):
        check_pins(nodes, "b:1", "", 1)
    with pytest.raises(InvalidArgument, match=r"device '7' is not on node a:1 \(its devices: 0\)"):
        check_pins(nodes, "a:1", "7", 1)
    check_pins(nodes, "a:1", "0", 1)


def test_the_default_kv_slots_are_the_neurons_own():
    assert default_slots(npb.InspectResponse(default_kv_slots=6)) == 6
    assert default_slots(npb.InspectResponse()) == 1  # a neuron that does not say: the least a load takes
