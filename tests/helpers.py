"""Launch real cortex/neuron processes on loopback ports chosen at run time."""
from __future__ import annotations

import atexit
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.rpc.channels import PLAINTEXT, ChannelSecurity, sync_channel

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MODELS = FIXTURES / "models"
REFERENCE = FIXTURES / "reference"
FIXTURE_NAMES = ["llama2", "llama3", "llama_sharded", "mistral", "qwen2", "qwen3"]

# CN_TEST_SECURITY=1: every server started through start_neuron/start_cortex runs with TLS (mutual
# on neurons), a cluster token and API keys, and Server.channel() connects with them, so a test
# module written for an open fleet runs unchanged against a secured one.
SECURE = os.environ.get("CN_TEST_SECURITY") == "1"


@dataclass(frozen=True)
class FleetSecrets:
    """A development CA, certificates, a cluster token and API keys (tools/make_dev_certs.py)."""
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def api_key(self, role: str) -> str:
        return next(line.split()[0] for line in (self.dir / "api-keys").read_text().splitlines()
                    if line.strip() and not line.startswith("#") and line.split()[1] == role)

    def token(self) -> str:
        return (self.dir / "cluster-token").read_text().strip()

    def server_flags(self, tls: bool = True, token: bool = True, api_keys: bool = False) -> list[str]:
        flags = []
        if tls:
            flags += ["--tls-cert", self.path("node.pem"), "--tls-key", self.path("node-key.pem"),
                      "--tls-ca", self.path("ca.pem")]
        if token:
            flags += ["--cluster-token-file", self.path("cluster-token")]
        if api_keys:
            flags += ["--api-keys", self.path("api-keys")]
        return flags

    def peer(self, tls: bool = True, token: bool = True) -> ChannelSecurity:
        """What cortex or a neuron presents: the node certificate and the cluster token."""
        from common.security.tls import TlsFiles
        files = TlsFiles(self.path("ca.pem"), self.path("node.pem"), self.path("node-key.pem"))
        return ChannelSecurity.for_peer(files if tls else TlsFiles(), self.token() if token else "")

    def client(self, role: str = "admin", tls: bool = True, cert: bool = False) -> ChannelSecurity:
        return ChannelSecurity.for_client(self.api_key(role) if role else "", self.path("ca.pem") if tls else "",
                                          self.path("client.pem") if cert else "",
                                          self.path("client-key.pem") if cert else "")


def make_secrets() -> FleetSecrets:
    from tools.make_dev_certs import make_dev_certs
    directory = Path(tempfile.mkdtemp(prefix="cn-secrets-"))
    make_dev_certs(directory, tokens=True)
    return FleetSecrets(directory)


@functools.cache
def session_secrets() -> FleetSecrets:
    return make_secrets()


@dataclass
class Server:
    """A server subprocess: its address, log file and how to stop it."""
    proc: subprocess.Popen
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    security: ChannelSecurity = PLAINTEXT  # what channel() connects with

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.aio.Channel:
        return sync_channel(self.address, self.security)

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# Servers started and not yet reaped: their logs are attached to failing tests' reports
# (tests/conftest.py), and whatever is still running when pytest exits is killed.
LIVE: list[Server] = []


@atexit.register
def _kill_leftovers() -> None:
    for server in LIVE:
        server.kill()


def start_server(argv: list[str], env: dict | None = None, timeout: float = 60.0,
                 listen: str = "127.0.0.1:0") -> Server:
    """Run `python -m <argv...> --listen LISTEN --port-file F` and wait for the port."""
    workdir = Path(tempfile.mkdtemp(prefix="cn-test-"))
    port_file, log_path = workdir / "port", workdir / "log"
    full_env = {**os.environ, "LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [sys.executable, *argv, "--listen", listen, "--port-file", str(port_file)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            server = Server(proc, int(port_file.read_text()), log_path, args)
            LIVE[:] = [s for s in LIVE if s.proc.poll() is None] + [server]
            return server
        if proc.poll() is not None:
            raise RuntimeError(f"{argv} exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{argv} did not start within {timeout}s:\n{log_path.read_text()}")


def start_neuron(devices: str = "cpu", model_roots: list[Path] | None = None, extra: list[str] | None = None,
                 env: dict | None = None, listen: str = "127.0.0.1:0") -> Server:
    roots = model_roots or [FIXTURES]
    # No metrics listener unless asked (extra may give --metrics-listen): neurons share this host.
    argv = ["-m", "neuron.cli", "serve", "--devices", devices, "--metrics-listen", "off"]
    for root in roots:
        argv += ["--model-root", str(root)]
    if SECURE:
        argv += session_secrets().server_flags()
    server = start_server(argv + (extra or []), env=env, listen=listen)
    if SECURE:
        server.security = session_secrets().peer()
    return server


def start_cortex(neurons: list[str] | None = None, extra: list[str] | None = None, env: dict | None = None,
                 listen: str = "127.0.0.1:0") -> Server:
    argv = ["-m", "cortex.cli", "serve", "--http-listen", "off"]  # extra may give --http-listen
    for address in neurons or []:
        argv += ["--neuron", address]
    if SECURE:
        argv += session_secrets().server_flags(api_keys=True)
    server = start_server(argv + (extra or []), env=env, listen=listen)
    if SECURE:
        server.security = session_secrets().client("admin")
    return server


def logged_port(server: Server, event: str, timeout: float = 30.0) -> int:
    """The port a server logged in its JSON line `event` (its HTTP or metrics listener on port 0)."""
    def find():
        for line in server.log().splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                return json.loads(line)["port"]
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.args[2]} exited with {server.proc.returncode}:\n{server.log()}")
        return None
    return wait_until(find, timeout, what=f"the log line {event!r}")


def free_port() -> int:
    """A port that was free a moment ago: for a server that must come back on the same address
    (a restart), or advertise its address before it binds. Everything else should use port 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "the condition"):
    """Poll predicate() until it returns something truthy (returned) or the timeout passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:g}s (last value: {value!r})")
        time.sleep(interval)


class EngineEvents:
    """A Generate caller's emit for in-process engine tests: token ids, the end event, and `done`."""

    def __init__(self):
        import threading
        self.tokens, self.end, self.done = [], None, threading.Event()

    def __call__(self, event):
        from neuron.generation import TokenEvent
        if isinstance(event, TokenEvent):
            self.tokens.append(event.token_id)
        else:
            self.end = event
            self.done.set()


def load_fixture_shard(worker, handle: int, name: str = "llama2", max_context: int = 256):
    """A fixture model loaded on an in-process DeviceWorker under `handle`; the Shard."""
    import threading

    from neuron.shard import LoadRequest
    from neuron.worker import LoadShardJob
    return worker.submit(LoadShardJob(LoadRequest(MODELS / name, name, max_context=max_context), handle,
                                      lambda p: None, threading.Event())).result(30)
