"""Graceful shutdown of a real neuron process on SIGTERM (what `docker stop` and Kubernetes send).

What "cleanly" means here (docs/operations.md, "Graceful shutdown"):
- at once: health turns NOT_SERVING (the port stays open, so probes see it) and new work is refused
  with UNAVAILABLE (retryable) and a message that says the node is draining; Describe still answers;
- a stream in flight that finishes within --drain-seconds completes normally (all its tokens, its
  finish reason and usage);
- a stream still running when the drain time is over ends with UNAVAILABLE and a message, never a
  hang or a broken connection; then the workers release device memory;
- the process exits 0 within the drain time plus a small margin, and as soon as the work is done
  when that is sooner.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.proto.neuron.v1 import neuron_pb2 as pb
from common.proto.neuron.v1 import neuron_pb2_grpc
from tests.helpers import MODELS, ROOT, start_neuron

pytestmark = pytest.mark.slow

MARGIN = 5.0          # seconds past the drain time that the exit may take (stop grace + process teardown)
LONG_CONTEXT = 65536  # the tiny fixture with a long context, so one generation can outlast the drain


@pytest.fixture(scope="module")
def long_model_root(tmp_path_factory):
    """The llama2 fixture with max_position_embeddings raised, so a generation can run for seconds."""
    root = tmp_path_factory.mktemp("models")
    target = root / "long"
    target.mkdir()
    for f in (MODELS / "llama2").iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = LONG_CONTEXT
    (target / "config.json").write_text(json.dumps(config))
    return root


class Stream:
    """Consumes a Generate stream on a thread and records how it ended."""

    def __init__(self, call):
        self.call = call
        self.tokens = 0
        self.first = threading.Event()
        self.last: pb.GenerateResponse | None = None
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for chunk in self.call:
                self.tokens += len(chunk.token_ids)
                self.last = chunk
                self.first.set()
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"


def generate(stub, handle: int, max_tokens: int):
    request = pb.GenerateRequest(handle=handle, prompt=pb.Prompt(tokens=pb.TokenIds(ids=[1, 5, 9])),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return stub.Generate(request, timeout=120)


def load(stub, max_seqs: int = 2) -> pb.ShardInfo:
    events = list(stub.LoadShard(pb.LoadShardRequest(path="long", model="long", max_context=LONG_CONTEXT,
                                                     max_seqs=max_seqs), timeout=60))
    return events[-1].loaded


def tokens_per_second(stub, handle: int, n: int = 400) -> float:
    started = time.monotonic()
    chunks = list(generate(stub, handle, n))
    assert sum(len(c.token_ids) for c in chunks) == n
    return n / (time.monotonic() - started)


def docker_healthcheck(address: str) -> subprocess.CompletedProcess:
    """The images' HEALTHCHECK: `cortex health ADDR`, exit 0 only on SERVING."""
    return subprocess.run([sys.executable, "-m", "cortex.cli", "health", address, "--timeout", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=20)


def wait_exit(server, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    try:
        rc = server.proc.wait(timeout)
    except Exception:  # noqa: BLE001 - reported below with the log
        server.kill()
        pytest.fail(f"the neuron did not exit within {timeout:.1f}s of SIGTERM:\n{server.log()[-3000:]}")
    return rc, time.monotonic() - started


def test_sigterm_drains_in_flight_streams_then_exits_zero(long_model_root):
    drain = 4.0
    server = start_neuron(model_roots=[long_model_root], extra=["--drain-seconds", str(drain)])
    channel = server.channel()
    try:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        serving = docker_healthcheck(server.address)
        assert serving.returncode == 0 and "SERVING" in serving.stdout, serving
        shard = load(stub)
        rate = tokens_per_second(stub, shard.handle)
        # Two concurrent streams share the device: each runs at about rate/2. The short one needs
        # ~0.6 s and must complete; the long one needs far more than the drain time and must be cut.
        short_tokens = max(50, int(rate * 0.3))
        long_tokens = LONG_CONTEXT - 16
        if long_tokens / rate < 2 * drain:
            pytest.skip(f"CPU decode at {rate:.0f} tok/s would finish {long_tokens} tokens too close to the "
                        f"{drain}s drain time; raise LONG_CONTEXT")
        short = Stream(generate(stub, shard.handle, short_tokens))
        long = Stream(generate(stub, shard.handle, long_tokens))
        assert short.first.wait(30) and long.first.wait(30)
        assert short.error is None and long.error is None

        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        # The port stays open while draining: health says NOT_SERVING, not "connection refused".
        deadline = signalled + drain
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        service_status = health.Check(health_pb2.HealthCheckRequest(service="neuron.v1.Neuron"), timeout=2).status
        assert service_status == health_pb2.HealthCheckResponse.NOT_SERVING

        # New work: refused, retryable, and the message says why.
        with pytest.raises(grpc.RpcError) as refused:
            list(generate(stub, shard.handle, 5))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused_load:
            load(stub)
        assert refused_load.value.code() == grpc.StatusCode.UNAVAILABLE
        # Diagnostics still answer during the drain; the container's health check fails at once.
        assert stub.Describe(pb.DescribeRequest(), timeout=5).devices
        draining = docker_healthcheck(server.address)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout, draining
        assert time.monotonic() < signalled + drain, "the checks above took longer than the drain time"

        # The short stream finished normally during the drain.
        short.join(drain + MARGIN)
        assert short.error is None, f"{short.error.code()}: {short.error.details()}"
        assert short.tokens == short_tokens
        assert short.last.finish_reason == pb.FINISH_REASON_LENGTH
        assert short.last.usage.completion_tokens == short_tokens

        # The long one is cut when the drain time is over, with a clear retryable status.
        long.join(drain + MARGIN)
        assert long.error is not None and long.tokens < long_tokens, "the long stream was not cut"
        assert long.error.code() == grpc.StatusCode.UNAVAILABLE, long.error
        assert "shutting down" in long.error.details()
        assert long.ended_at - signalled >= drain - 0.5, "cut before the drain time was over"

        rc, _ = wait_exit(server, drain + MARGIN - (time.monotonic() - signalled))
        log = server.log()
        assert rc == 0, log[-3000:]
        assert "neuron stopped" in log
        assert "Traceback" not in log, log[-3000:]
    finally:
        channel.close()
        server.kill()


def test_sigterm_exits_as_soon_as_the_work_is_done(long_model_root):
    """A long drain time is an upper bound, not a wait: the process leaves when nothing is in flight."""
    drain = 30.0
    server = start_neuron(model_roots=[long_model_root], extra=["--drain-seconds", str(drain)])
    channel = server.channel()
    try:
        stub = neuron_pb2_grpc.NeuronStub(channel)
        shard = load(stub, max_seqs=1)
        rate = tokens_per_second(stub, shard.handle)
        n = max(50, int(rate * 0.5))
        stream = Stream(generate(stub, shard.handle, n))
        assert stream.first.wait(30)
        server.proc.send_signal(signal.SIGTERM)
        rc, took = wait_exit(server, drain)
        stream.join(5)
        assert stream.error is None, f"{stream.error.code()}: {stream.error.details()}"
        assert stream.tokens == n and stream.last.finish_reason == pb.FINISH_REASON_LENGTH
        assert rc == 0, server.log()[-3000:]
        assert took < 10.0, f"exit took {took:.1f}s with nothing left in flight"
    finally:
        channel.close()
        server.kill()


def test_sigterm_when_idle_exits_at_once():
    server = start_neuron(extra=["--drain-seconds", "30"])
    server.proc.send_signal(signal.SIGTERM)
    rc, took = wait_exit(server, 30)
    assert rc == 0, server.log()[-3000:]
    assert took < 5.0
    assert "neuron stopped" in server.log()
