"""cortex/local.py starts children with no Python code between fork and exec (a preexec_fn in a
process with live gRPC threads can deadlock the child), and the children still die with the
process that started them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cortex import local
from tests.helpers import MODELS, ROOT, wait_until


def test_children_are_started_without_a_preexec_fn(monkeypatch, tmp_path):
    seen = {}

    def fake_popen(args, **kwargs):
        seen.update(kwargs, args=args)
        raise OSError("not starting anything in this test")
    monkeypatch.setattr(local.subprocess, "Popen", fake_popen)
    with pytest.raises(OSError):
        local.start_server("neuron", "neuron.cli", ["--listen", "127.0.0.1:0"], tmp_path)
    assert seen.get("preexec_fn") is None
    assert seen.get("start_new_session") or seen.get("process_group") is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_child_server_dies_with_the_process_that_started_it(tmp_path):
    script = textwrap.dedent(f"""
        import grpc, sys, time
        from pathlib import Path
        from cortex.local import neuron_args, start_server
        channel = grpc.insecure_channel("127.0.0.1:1")  # live gRPC threads in the parent
        server = start_server("neuron", "neuron.cli", neuron_args(model_roots=[{str(MODELS)!r}]), Path({str(tmp_path)!r}))
        print(server.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_until(lambda: not _alive(child), timeout=15, what="the child server to exit with its parent")
