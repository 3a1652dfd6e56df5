"""Run cortex and neuron servers as local subprocesses: for `cortex demo`, tests and benchmarks.

Each server listens on a port it picks itself (`--listen 127.0.0.1:0`) and writes it to a port
file, so nothing races for ports. Output goes to a log file (a pipe nobody reads would block the
server once full). On Linux the children are killed if this process dies, so an interrupted run
leaves no servers behind. Each child runs in its own session, so a Ctrl-C at the terminal reaches
only this process, which then shuts the children down in its own order (unload first, then SIGTERM).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class ServerFailed(RuntimeError):
    pass


@dataclass
class LocalServer:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path
    port: int = 0
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self, lines: int | None = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:]) if lines else text

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (the server drains and exits), SIGKILL if it has not exited within timeout.
        Returns the exit code (negative: killed by that signal)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        if self.alive():
            self.process.kill()
        return self.process.wait()


def start_server(name: str, module: str, args: list[str], workdir: Path, timeout: float = 30.0,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1") -> LocalServer:
    """Start `python -m MODULE serve ARGS --port-file F` and wait until it serves.
    ARGS should include --listen HOST:0 (or a fixed port). Raises ServerFailed with the log's tail
    if it exits or does not serve within timeout."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    argv = [sys.executable, "-m", module, "serve", *args, "--port-file", str(port_file)]
    environment = {**os.environ, "LOG_FORMAT": "json", **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=environment, start_new_session=True,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    server = LocalServer(name, argv, process, log_path, host=host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists() and (text := port_file.read_text().strip()):
            server.port = int(text)
            return server
        if not server.alive():
            raise ServerFailed(f"{name} exited with code {process.returncode} before serving:\n{server.logs(40)}")
        time.sleep(0.05)
    server.kill()
    raise ServerFailed(f"{name} did not start serving within {timeout:g}s:\n{server.logs(40)}")


def neuron_args(devices: str = "cpu:0", model_roots: list[str | Path] = (), cortex: str = "",
                listen: str = "127.0.0.1:0", cpu_memory_gb: float | None = None, advertise: str = "",
                extra: list[str] = (), metrics_listen: str = "off") -> list[str]:
    args = ["--listen", listen, "--devices", devices, "--metrics-listen", metrics_listen]
    for root in model_roots:
        args += ["--model-root", str(root)]
    if cortex:
        args += ["--cortex", cortex]
    if advertise:
        args += ["--advertise", advertise]
    if cpu_memory_gb is not None:
        args += ["--cpu-memory-gb", str(cpu_memory_gb)]
    return [*args, *extra]


def cortex_args(neurons: list[str] = (), listen: str = "127.0.0.1:0", poll_seconds: float | None = None,
                heartbeat_timeout_seconds: float | None = None, extra: list[str] = (),
                http_listen: str = "off") -> list[str]:
    args = ["--listen", listen, "--http-listen", http_listen]
    for address in neurons:
        args += ["--neuron", address]
    if poll_seconds is not None:
        args += ["--poll-seconds", str(poll_seconds)]
    if heartbeat_timeout_seconds is not None:
        args += ["--heartbeat-timeout-seconds", str(heartbeat_timeout_seconds)]
    return [*args, *extra]
