"""The `cortex` command line against real servers: client subcommands (text and --json), errors
without tracebacks, health for cortex and neuron, serve's settings from TOML / env / flags, draining
on SIGTERM, and `cortex demo` end to end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from cortex.client import CortexClient, check_health
from common.proto.cortex.v1 import cortex_pb2 as cpb
from tests.helpers import MODELS, REFERENCE, ROOT, free_port, start_cortex, start_neuron, wait_until

pytestmark = pytest.mark.slow


def cortex_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cortex.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def fleet():
    neuron = start_neuron("cpu:0", [MODELS])
    cortex = start_cortex([neuron.address], extra=["--poll-seconds", "0.5"])
    try:
        with CortexClient(cortex.address, timeout=10) as client:
            wait_until(lambda: [n.state for n in client.nodes()] == [cpb.NODE_STATE_UP], what="the neuron UP")
        yield cortex, neuron
    finally:
        cortex.kill()
        neuron.kill()


@pytest.fixture(scope="module")
def loaded(fleet):
    cortex, _ = fleet
    run = cortex_cli("--cortex", cortex.address, "load", "llama2", "--name", "cli")
    assert run.returncode == 0, run.stderr
    yield run
    cortex_cli("--cortex", cortex.address, "unload", "cli")


def test_load_prints_placement_progress_and_the_result(loaded, fleet):
    _, neuron = fleet
    assert "cli: READY - LlamaForCausalLM float32" in loaded.stdout and neuron.address in loaded.stdout
    # Not a terminal: progress comes as lines on stderr, the placement decision first.
    lines = loaded.stderr.splitlines()
    assert lines[0].startswith("placing cli (LlamaForCausalLM, float32")
    assert any("100%" in line and "reading" in line for line in lines)


def test_models_and_nodes_as_text_and_json(loaded, fleet):
    cortex, neuron = fleet
    text = cortex_cli("--cortex", cortex.address, "models")
    assert text.returncode == 0 and "cli" in text.stdout and "READY" in text.stdout and "llama2" not in text.stderr
    models = json.loads(cortex_cli("--cortex", cortex.address, "--json", "models").stdout)["models"]
    assert [(m["name"], m["state"], m["placement"][0]["node"]) for m in models] == \
        [("cli", "MODEL_STATE_READY", neuron.address)]
    nodes = json.loads(cortex_cli("nodes", "--json", "--cortex", cortex.address).stdout)["nodes"]
    assert [(n["address"], n["state"]) for n in nodes] == [(neuron.address, "NODE_STATE_UP")]
    # The address can come from CORTEX_ADDRESS too.
    env = cortex_cli("nodes", env={"CORTEX_ADDRESS": cortex.address})
    assert env.returncode == 0 and neuron.address in env.stdout


def test_generate_streams_text_or_json_lines(loaded, fleet):
    cortex, _ = fleet
    ref = np.load(REFERENCE / "llama2.npz")
    tokens = ",".join(map(str, ref["prompt_ids"].tolist()))
    run = cortex_cli("--cortex", cortex.address, "generate", "cli", "--tokens", tokens, "--max-tokens", "32",
                     "--temperature", "0", "--ignore-eos", "--json")
    assert run.returncode == 0, run.stderr
    chunks = [json.loads(line) for line in run.stdout.splitlines()]
    assert [t for c in chunks for t in c.get("token_ids", [])] == ref["greedy_ids"].tolist()
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"

    text = cortex_cli("--cortex", cortex.address, "generate", "cli", "--prompt", "Hello", "--max-tokens", "8",
                      "--ignore-eos")
    with CortexClient(cortex.address) as client:
        expected = client.generate_text("cli", "Hello", max_tokens=8, ignore_eos=True)
    assert text.returncode == 0 and text.stdout == expected + "\n"
    assert "5 prompt + 8 generated tokens, finish: length (max_tokens)" in text.stderr

    # Every sampling field of the API has its flag; the request id comes back on every chunk.
    greedy = ref["greedy_ids"].tolist()
    stopped = cortex_cli("--cortex", cortex.address, "generate", "cli", "--tokens", tokens, "--max-tokens", "32",
                         "--temperature", "0", "--min-p", "0.1", "--repetition-penalty", "1.0",
                         "--stop-token-ids", str(greedy[3]), "--request-id", "cli-req-1", "--json")
    assert stopped.returncode == 0, stopped.stderr
    chunks = [json.loads(line) for line in stopped.stdout.splitlines()]
    assert {c["request_id"] for c in chunks} == {"cli-req-1"}
    assert chunks[-1]["stop_reason"] == f"stop_token:{greedy[3]}"


def test_forward_writes_the_logits(loaded, fleet, tmp_path):
    cortex, _ = fleet
    ref = np.load(REFERENCE / "llama2.npz")
    out = tmp_path / "logits.npy"
    run = cortex_cli("--cortex", cortex.address, "forward", "cli", "--tokens",
                     ",".join(map(str, ref["prompt_ids"].tolist())), "--output", str(out), "--all-positions")
    assert run.returncode == 0, run.stderr
    logits = np.load(out)
    assert np.linalg.norm(logits - ref["logits_all"]) / np.linalg.norm(ref["logits_all"]) < 1e-4
    summary = json.loads(cortex_cli("--cortex", cortex.address, "forward", "cli", "--tokens", "1,2,3",
                                    "--json").stdout)
    assert summary["shape"] == [450] and len(summary["top"]) == 5


def test_errors_print_the_status_and_exit_nonzero_without_a_traceback(loaded, fleet):
    cortex, _ = fleet
    run = cortex_cli("--cortex", cortex.address, "generate", "nope", "--prompt", "x")
    assert run.returncode == 1 and run.stderr.startswith("error: NOT_FOUND: model 'nope' is not loaded")
    as_json = cortex_cli("--cortex", cortex.address, "--json", "unload", "nope")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"]["code"] == "NOT_FOUND"
    bad_tokens = cortex_cli("--cortex", cortex.address, "forward", "cli", "--tokens", "1,x")
    assert bad_tokens.returncode == 2 and "comma-separated token ids" in bad_tokens.stderr
    unreachable = cortex_cli("--cortex", f"127.0.0.1:{free_port()}", "--timeout", "2", "models")
    assert unreachable.returncode == 1 and "UNAVAILABLE" in unreachable.stderr
    for result in (run, as_json, bad_tokens, unreachable):
        assert "Traceback" not in result.stderr


def test_health_of_cortex_and_neuron(fleet):
    cortex, neuron = fleet
    assert cortex_cli("--cortex", cortex.address, "health").returncode == 0
    run = cortex_cli("health", neuron.address, "--json")
    assert run.returncode == 0 and json.loads(run.stdout) == {"address": neuron.address, "status": "SERVING"}
    down = cortex_cli("health", f"127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout


def test_serve_takes_settings_from_flags_then_env_then_toml(tmp_path):
    config = tmp_path / "cortex.toml"
    config.write_text('neuron = ["10.0.0.1:1"]\npoll_seconds = 0.5\n')
    from_toml = start_cortex(extra=["--config", str(config)])
    from_env = start_cortex(extra=["--config", str(config)], env={"CORTEX_NEURON": "10.0.0.2:2,10.0.0.3:3"})
    from_flag = start_cortex(["10.0.0.4:4"], extra=["--config", str(config)], env={"CORTEX_NEURON": "10.0.0.2:2"})
    try:
        for server, expected in ((from_toml, ["10.0.0.1:1"]), (from_env, ["10.0.0.2:2", "10.0.0.3:3"]),
                                 (from_flag, ["10.0.0.4:4"])):
            with CortexClient(server.address, timeout=10) as client:
                assert [n.address for n in client.nodes()] == expected
    finally:
        for server in (from_toml, from_env, from_flag):
            server.kill()
    bad = cortex_cli("serve", "--listen", "127.0.0.1:0", "--neuron", "no-port")
    assert bad.returncode != 0 and "--neuron 'no-port' is not HOST:PORT" in bad.stderr


def test_sigterm_drains_streams_in_flight_refuses_new_calls_and_exits_zero(tmp_path):
    root = tmp_path / "models"
    shutil.copytree(MODELS / "llama2", root / "long")
    config = json.loads((root / "long" / "config.json").read_text())
    config["max_position_embeddings"] = 65536
    (root / "long" / "config.json").write_text(json.dumps(config))
    neuron = start_neuron("cpu:0", [root])
    cortex = start_cortex([neuron.address], extra=["--drain-seconds", "20"])
    try:
        with CortexClient(cortex.address, timeout=30) as client:
            wait_until(lambda: client.nodes()[0].state == cpb.NODE_STATE_UP, what="the neuron UP")
            client.load("long", name="long", max_context=65536)
            stats = list(client.generate("long", token_ids=[1, 2], max_tokens=200, ignore_eos=True))[-1]
            # A stream that runs about two seconds: long enough to SIGTERM in its middle.
            n = min(60000, max(200, int(stats.timing.decode_tokens_per_second * 2)))
            received, error = [], []
            first = threading.Event()

            def consume():
                try:
                    for chunk in client.generate("long", token_ids=[1, 2], max_tokens=n, ignore_eos=True):
                        received.extend(chunk.token_ids)
                        first.set()
                except grpc.RpcError as err:
                    error.append(err)
                    first.set()

            thread = threading.Thread(target=consume)
            thread.start()
            assert first.wait(10)
            cortex.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: check_health(cortex.address) == "NOT_SERVING", timeout=5, what="NOT_SERVING")
            with pytest.raises(grpc.RpcError) as refused:
                list(client.generate("long", token_ids=[1], max_tokens=1))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
            assert client.models()[0].name == "long"  # listings still answer while draining
            thread.join(30)
            assert not error and len(received) == n
            assert cortex.proc.wait(10) == 0
    finally:
        cortex.kill()
        neuron.kill()


def test_demo_runs_end_to_end_and_shuts_down_cleanly():
    started = time.monotonic()
    run = cortex_cli("demo", timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert out.count("serving after") == 3 and "READY on node 127.0.0.1:" in out and "tokens/s" in out
    assert "SIGTERM -> cortex exited 0, neuron-2 exited 0, neuron-1 exited 0" in out
    assert out.rstrip().endswith("done: every process exited cleanly")
    assert time.monotonic() - started < 60


def test_demo_keep_running_then_ctrl_c_unloads_and_exits_zero():
    # As a terminal does: the demo in a process group of its own, and Ctrl-C's SIGINT sent to that
    # whole group. The servers the demo started must not get it (they would drain before the unload).
    demo = subprocess.Popen([sys.executable, "-u", "-m", "cortex.cli", "demo", "--keep-running", "--max-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)
    lines = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        assert "press Ctrl-C" in "".join(lines), "".join(lines)
        os.killpg(demo.pid, signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    out = "".join(lines) + rest
    assert demo.returncode == 0, out
    assert "interrupted: unloading and shutting down" in out and "unload     tiny-llama: freed" in out
    assert "SIGTERM -> cortex exited 0, neuron-2 exited 0, neuron-1 exited 0" in out
    assert out.rstrip().endswith("done: every process exited cleanly")
