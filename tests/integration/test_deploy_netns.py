"""A fleet across "hosts": cortex and two neurons, each in its own network namespace with its own
address, joined by veth pairs to a bridge in the root namespace (the test's "switch").

    root ns (the test, a client)  10.77.N.1  ── bridge ──┬── veth ── ns cortex   10.77.N.10:50051
                                                         ├── veth ── ns neuron-0 10.77.N.11:50061
                                                         └── veth ── ns neuron-1 10.77.N.12:50061

The neurons register with cortex by its address and advertise their own, exactly as neurons on other
hosts do (docker-compose.multihost.yml). Then a host's link is cut (`ip link set ... down`): cortex
must report that node DOWN and its models UNAVAILABLE within the heartbeat deadline, refuse requests
for them with UNAVAILABLE, and recover when the link comes back. Stage 1 does this with a TP=1 model;
stage 2 with a TP=2 model whose ranks live on the two namespaced neurons.

Needs root (CAP_NET_ADMIN) and iproute2; skips with the reason elsewhere. Everything it creates is
named cnt-<pid>-* / cn<pid>* and removed in `finally`, also after a failure, and leftovers of a run
that died are removed before a new run starts.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from common.proto.cortex.v1 import cortex_pb2 as cpb
from tests.helpers import MODELS, ROOT

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT = 3.0     # cortex --heartbeat-timeout-seconds: neurons heartbeat every second
POLL_SECONDS = 0.5          # cortex --poll-seconds (3 missed polls also mark a node down)
# DOWN must be reported within the heartbeat deadline, plus one poll round and the poll timeout.
DOWN_DEADLINE = HEARTBEAT_TIMEOUT + 2 * POLL_SECONDS + 1.0
RECOVER_DEADLINE = 15.0     # reconnect backoff (<= 2 s) + a heartbeat + a poll, with room
PROMPT = [1, 5, 9, 14]
TOKENS = 8


# ---------------------------------------------------------------- the namespaces

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_leftovers() -> None:
    """Namespaces (and what runs in them) and bridges of earlier runs whose test process is gone."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"(cnt-(\d+)-\S+)", line)
        if m and not _pid_alive(int(m.group(2))):
            _kill_namespace_processes(m.group(1))
            _ip("netns", "del", m.group(1), check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+(cnb(\d+))[:@]", line)
        if m and not _pid_alive(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies (PR_SET_PDEATHSIG survives exec)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def namespaces_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN)"
    probe = f"cnt-{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed (no CAP_NET_ADMIN or no netns support?): {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str          # cortex, neuron-0, neuron-1
    ns: str
    ip: str
    host_if: str       # veth end on the bridge (root namespace): cutting it cuts the host off
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


@dataclass
class Topology:
    pid: int = field(default_factory=os.getpid)
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self):
        self.bridge = f"cnb{self.pid}"
        self.subnet = f"10.77.{self.pid % 200 + 20}"
        self.gateway = f"{self.subnet}.1"

    def create(self, names: list[str]) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(names):
            host = Host(name, f"cnt-{self.pid}-{name}", f"{self.subnet}.{10 + i}", f"cn{self.pid}{i}h")
            peer = f"cn{self.pid}{i}n"
            self.hosts[name] = host
            _ip("netns", "add", host.ns)
            _ip("link", "add", host.host_if, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", host.ns)
            _ip("link", "set", host.host_if, "master", self.bridge)
            _ip("link", "set", host.host_if, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", peer)
            _ip("-n", host.ns, "link", "set", peer, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "route", "add", "default", "via", self.gateway)

    def cut(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].host_if, "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].host_if, "up")

    def destroy(self) -> None:
        for host in self.hosts.values():
            if host.proc and host.proc.poll() is None:
                host.proc.kill()
                host.proc.wait(10)
        for host in self.hosts.values():
            _kill_namespace_processes(host.ns)
            _ip("netns", "del", host.ns, check=False)       # takes its veth pair along
            _ip("link", "del", host.host_if, check=False)   # in case the namespace was already gone
        _ip("link", "del", self.bridge, check=False)

    def start(self, name: str, argv: list[str], port: int, timeout: float = 60.0) -> Host:
        """Run `python -m argv...` inside the host's namespace; wait until it listens."""
        host = self.hosts[name]
        workdir = Path(tempfile.mkdtemp(prefix=f"cn-netns-{name}-"))
        host.log_path = workdir / "log"
        port_file = workdir / "port"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(LOG_FORMAT="json", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        cmd = ["ip", "netns", "exec", host.ns, sys.executable, *argv,
               "--listen", f"0.0.0.0:{port}", "--port-file", str(port_file)]
        with open(host.log_path, "w") as log:
            host.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                return host
            if host.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {host.proc.returncode}:\n{host.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start within {timeout}s:\n{host.log()}")

    def check_reachable(self, port: int, name: str) -> None:
        try:
            socket.create_connection((self.hosts[name].ip, port), timeout=3).close()
        except OSError as err:
            pytest.fail(f"{name} at {self.hosts[name].ip}:{port} is not reachable from the root namespace over "
                        f"the bridge ({err}); a host firewall (br_netfilter + iptables FORWARD/INPUT) may drop it")


# ---------------------------------------------------------------- the fleet

@pytest.fixture(scope="module")
def fleet():
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    remove_leftovers()
    topo = Topology()
    try:
        topo.create(["cortex", "neuron-0", "neuron-1"])
        cortex = topo.start("cortex", ["-m", "cortex.cli", "serve",
                                       "--heartbeat-timeout-seconds", str(HEARTBEAT_TIMEOUT),
                                       "--poll-seconds", str(POLL_SECONDS), "--group-timeout-seconds", "20"],
                            port=50051)
        cortex_address = f"{cortex.ip}:50051"
        for name in ("neuron-0", "neuron-1"):
            ip = topo.hosts[name].ip
            topo.start(name, ["-m", "neuron.cli", "serve", "--devices", "cpu", "--cpu-memory-gb", "1",
                              "--model-root", str(MODELS), "--cortex", cortex_address,
                              "--advertise", f"{ip}:50061", "--drain-seconds", "2"], port=50061)
        topo.check_reachable(50051, "cortex")
        from cortex.client import CortexClient
        client = CortexClient(cortex_address, timeout=10)
        wait_for(lambda: {n.address for n in client.nodes() if n.state == UP} == neuron_addresses(topo),
                 20, "both neurons registered and UP", topo)
        yield topo, client
        client.close()
    finally:
        for host in topo.hosts.values():
            if host.proc and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
        for host in topo.hosts.values():
            if host.proc:
                try:
                    host.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        topo.destroy()


UP, DOWN = cpb.NODE_STATE_UP, cpb.NODE_STATE_DOWN


def neuron_addresses(topo: Topology) -> set[str]:
    return {f"{topo.hosts[n].ip}:50061" for n in ("neuron-0", "neuron-1")}


def logs(topo: Topology) -> str:
    return "\n".join(f"--- {h.name} ---\n{h.log()[-2500:]}" for h in topo.hosts.values())


def wait_for(condition, timeout: float, what: str, topo: Topology) -> float:
    """Poll `condition` until true; return the seconds it took."""
    started = time.monotonic()
    last_error = None
    while time.monotonic() - started < timeout:
        try:
            if condition():
                return time.monotonic() - started
        except grpc.RpcError as err:
            last_error = f"{err.code()}: {err.details()}"
        time.sleep(0.1)
    pytest.fail(f"not within {timeout:.1f}s: {what} (last error: {last_error})\n{logs(topo)}")


def node_state(client, address: str):
    return next((n for n in client.nodes() if n.address == address), None)


def greedy(client, model: str) -> list[int]:
    chunks = list(client.generate(model, token_ids=PROMPT, max_tokens=TOKENS, temperature=0.0, ignore_eos=True,
                                  timeout=30))
    assert chunks[-1].finish_reason != 0
    return [t for c in chunks for t in c.token_ids]


def cut_and_recover(topo: Topology, client, model: str, host_name: str, expected: list[int]) -> None:
    """Cut `host_name` off; its node goes DOWN and the model UNAVAILABLE in time; then it recovers."""
    address = f"{topo.hosts[host_name].ip}:50061"
    topo.cut(host_name)
    cut_at = time.monotonic()
    try:
        took = wait_for(lambda: node_state(client, address).state == DOWN, DOWN_DEADLINE + 2,
                        f"{host_name} reported DOWN", topo)
        assert took <= DOWN_DEADLINE, f"{host_name} reported DOWN after {took:.1f}s, deadline {DOWN_DEADLINE:.1f}s"
        node = node_state(client, address)
        assert node.reason, "a DOWN node says why"
        info = client.model(model)
        assert info.state == cpb.MODEL_STATE_UNAVAILABLE, cpb.ModelState.Name(info.state)
        assert address in info.reason, f"UNAVAILABLE names the node that is down: {info.reason!r}"
        with pytest.raises(grpc.RpcError) as refused:
            greedy(client, model)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert time.monotonic() - cut_at < 30
        # The other neuron stays UP.
        others = neuron_addresses(topo) - {address}
        assert all(node_state(client, a).state == UP for a in others)
    finally:
        topo.restore(host_name)
    wait_for(lambda: node_state(client, address).state == UP, RECOVER_DEADLINE, f"{host_name} UP again", topo)
    wait_for(lambda: client.model(model).state == cpb.MODEL_STATE_READY, RECOVER_DEADLINE,
             f"{model} READY again", topo)
    assert greedy(client, model) == expected, "after recovery the model generates the same tokens"


# ---------------------------------------------------------------- stage 1: TP=1

def test_tp1_model_survives_a_cut_link(fleet):
    topo, client = fleet
    target = f"{topo.hosts['neuron-0'].ip}:50061"
    info = client.load("llama2", "tiny", max_context=64, kv_slots=2, node=target, timeout=60)
    assert info.state == cpb.MODEL_STATE_READY, info
    assert [p.node for p in info.placement] == [target]
    expected = greedy(client, "tiny")
    assert len(expected) == TOKENS
    cut_and_recover(topo, client, "tiny", "neuron-0", expected)
    client.unload("tiny")


# ---------------------------------------------------------------- stage 2: TP=2 across the hosts

def tensor_parallel_available() -> str | None:
    from neuron.server import NeuronService
    from common.proto.neuron.v1 import neuron_pb2_grpc
    if NeuronService.InitGroup is neuron_pb2_grpc.NeuronServicer.InitGroup:
        return "the neuron does not implement InitGroup yet (tensor parallelism not landed)"
    return None


def test_tp2_across_two_hosts_survives_a_cut_link(fleet):
    reason = tensor_parallel_available()
    if reason:
        pytest.skip(reason)
    topo, client = fleet
    reference = client.load("llama2", "tiny-ref", max_context=64, kv_slots=1, timeout=60)
    assert reference.state == cpb.MODEL_STATE_READY
    expected = greedy(client, "tiny-ref")
    client.unload("tiny-ref")

    info = client.load("llama2", "tiny-tp2", tp=2, max_context=64, kv_slots=2, timeout=60)
    assert info.state == cpb.MODEL_STATE_READY, info
    ranks = sorted(info.placement, key=lambda p: p.rank)
    assert {p.node for p in ranks} == neuron_addresses(topo), f"TP=2 must span both hosts: {ranks}"
    assert greedy(client, "tiny-tp2") == expected, "TP=2 across hosts generates what TP=1 does"

    follower = next(h for h in ("neuron-0", "neuron-1") if f"{topo.hosts[h].ip}:50061" == ranks[1].node)
    cut_and_recover(topo, client, "tiny-tp2", follower, expected)
    client.unload("tiny-tp2")
