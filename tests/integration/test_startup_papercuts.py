"""What an operator sees when the other side is not there: a neuron whose --cortex is unreachable
logs it and keeps retrying until cortex appears; a node cortex never reached says why (connection
refused, not a deadline); a neuron's CPU devices do not each advertise the whole host's memory."""
from __future__ import annotations

import json

import grpc

from common.proto.neuron.v1 import neuron_pb2 as npb
from common.proto.neuron.v1 import neuron_pb2_grpc
from cortex.client import CortexClient, node_state
from tests.helpers import MODELS, free_port, start_cortex, start_neuron, wait_until


def log_events(server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def test_a_neuron_logs_an_unreachable_cortex_and_registers_once_it_is_there():
    port = free_port()
    neuron = start_neuron("cpu:0", [MODELS], extra=["--cortex", f"127.0.0.1:{port}", "--heartbeat-seconds", "0.2"])
    cortex = None
    try:
        warning = wait_until(lambda: next((e for e in log_events(neuron) if e["event"] == "cortex unreachable; retrying"),
                                          None), what="the neuron's warning")
        assert warning["level"] == "warning" and warning["cortex"] == f"127.0.0.1:{port}"
        assert warning["code"] == "UNAVAILABLE" and "refused" in warning["error"].lower()
        cortex = start_cortex(listen=f"127.0.0.1:{port}")
        with CortexClient(cortex.address, timeout=10) as client:
            wait_until(lambda: [node_state(n) for n in client.nodes()] == ["UP"], what="the neuron registered and UP")
        assert any(e["event"] == "registered with cortex" for e in log_events(neuron))
    finally:
        for server in (cortex, neuron):
            if server is not None:
                server.kill()


def test_a_node_cortex_never_reached_says_why():
    nobody = f"127.0.0.1:{free_port()}"
    cortex = start_cortex([nobody], extra=["--poll-seconds", "0.5"])
    try:
        with CortexClient(cortex.address, timeout=10) as client:
            (node,) = client.nodes()
            assert node_state(node) == "DOWN"
            assert node.reason.startswith("not reached yet: UNAVAILABLE: ") and "refused" in node.reason.lower()
            assert "DEADLINE_EXCEEDED" not in node.reason
    finally:
        cortex.kill()


def test_cpu_devices_share_the_hosts_memory():
    neuron = start_neuron("cpu:0,cpu:1,cpu:2", [MODELS])
    try:
        with grpc.insecure_channel(neuron.address) as channel:
            devices = neuron_pb2_grpc.NeuronStub(channel).Describe(npb.DescribeRequest(), timeout=10).devices
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        assert len(devices) == 3
        assert sum(d.free_bytes for d in devices) <= total
        assert sum(d.total_bytes for d in devices) <= total
    finally:
        neuron.kill()
