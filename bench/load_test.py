"""Load and fault tests of cortex + neuron on CPU (not a timed test: a script that measures).

    python bench/load_test.py                       # the fault matrix, then 2,048 streams
    python bench/load_test.py --only faults         # just the fault matrix
    python bench/load_test.py --only load --streams 512

1. **Load**: N concurrent Generate streams (over several channels) through cortex to one CPU neuron
   serving a tiny model. Every accepted request must complete or get RESOURCE_EXHAUSTED (the
   bounded waiting queue); health of both servers is probed every 50 ms throughout, from a process
   of its own (p50/p99/max);
   peak RSS of both processes is sampled.
2. **Fault matrix**: with streams in flight on a model that generates for many seconds, each fault
   (kill -9, SIGSTOP, then restart / SIGCONT) of each process. Measured from the fault: when the
   streams in flight ended (and with which code), when cortex showed the node DOWN, and, after the
   restart, when a new Generate worked again ("recovered"; a restarted neuron's model is loaded
   again, a restarted cortex re-adopts the model).

Writes bench/results/load_test-<time>.json and prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from common.proto.cortex.v1 import cortex_pb2 as cpb  # noqa: E402
from common.proto.cortex.v1 import cortex_pb2_grpc  # noqa: E402
from common.server import CHANNEL_OPTIONS  # noqa: E402
from cortex.local import cortex_args, neuron_args, start_server  # noqa: E402
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint  # noqa: E402

MODELS = ROOT / "tests" / "fixtures" / "models"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Fleet:
    """One neuron and one cortex on fixed loopback ports (so either can be restarted in place)."""

    def __init__(self, workdir: Path, roots: list[Path], poll_seconds: float = 2.0):
        self.workdir, self.roots, self.poll_seconds = workdir, roots, poll_seconds
        self.neuron_port, self.cortex_port = free_port(), free_port()
        self.neuron = self.cortex = None

    def start_neuron(self):
        self.neuron = start_server("neuron", "neuron.cli", neuron_args(
            model_roots=self.roots, listen=f"127.0.0.1:{self.neuron_port}"), self.workdir, timeout=60)
        return self.neuron

    def start_cortex(self):
        self.cortex = start_server("cortex", "cortex.cli", cortex_args(
            [f"127.0.0.1:{self.neuron_port}"], listen=f"127.0.0.1:{self.cortex_port}",
            poll_seconds=self.poll_seconds), self.workdir, timeout=60)
        return self.cortex

    @property
    def cortex_address(self) -> str:
        return f"127.0.0.1:{self.cortex_port}"

    def stop(self) -> None:
        for server in (self.cortex, self.neuron):
            if server is not None and server.alive():
                os.kill(server.pid, signal.SIGCONT)
                server.kill()


def sync_stub(address: str):
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return channel, cortex_pb2_grpc.CortexStub(channel)


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        time.sleep(interval)
    return False


def load_model(stub, name: str, path: str, **fields) -> None:
    for _ in stub.LoadModel(cpb.LoadModelRequest(name=name, path=path, **fields), timeout=120):
        pass


# ------------------------------------------------------------------------------------------ load

PROBE = """
import json, sys, time, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
stub = health_pb2_grpc.HealthStub(channel)
for line in sys.stdin:  # one line per probe asked for; an empty line ends it
    if not line.strip():
        break
    started = time.perf_counter()
    try:
        stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        print(json.dumps({"ms": (time.perf_counter() - started) * 1e3}), flush=True)
    except grpc.RpcError as err:
        print(json.dumps({"error": err.code().name}), flush=True)
"""


class HealthProbe:
    """Health checks every 50 ms from a process of their own, so that the latency measured is the
    server's and not the load generator's busy event loop."""

    def __init__(self, address: str):
        import subprocess
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, address], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.latencies: list[float] = []
        self.failures: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.proc.stdin.write("probe\n")
            reply = json.loads(self.proc.stdout.readline())
            if "ms" in reply:
                self.latencies.append(reply["ms"])
            else:
                self.failures[reply["error"]] += 1
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.proc.wait(10)


async def _one_stream(stub, max_tokens: int, outcome: Counter, errors: Counter) -> None:
    request = cpb.GenerateRequest(model="tiny", prompt=cpb.Prompt(text="the cortex places"),
                                  sampling=cpb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    tokens = 0
    try:
        async for chunk in stub.Generate(request, timeout=300):
            tokens += len(chunk.token_ids)
        outcome["OK" if tokens == max_tokens else "OK_SHORT"] += 1
    except grpc.aio.AioRpcError as err:
        outcome[err.code().name] += 1
        errors[f"{err.code().name}: {(err.details() or '')[:120]}"] += 1


async def run_load(fleet: Fleet, streams: int, channels: int, max_tokens: int) -> dict:
    stop = threading.Event()
    probes = {name: HealthProbe(f"127.0.0.1:{port}")
              for name, port in (("cortex", fleet.cortex_port), ("neuron", fleet.neuron_port))}
    peak = {"cortex": rss_bytes(fleet.cortex.pid), "neuron": rss_bytes(fleet.neuron.pid)}
    start_rss = dict(peak)

    def sample_rss():
        while not stop.is_set():
            for name, server in (("cortex", fleet.cortex), ("neuron", fleet.neuron)):
                peak[name] = max(peak[name], rss_bytes(server.pid))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    outcome, errors = Counter(), Counter()
    pool = [grpc.aio.insecure_channel(fleet.cortex_address, options=CHANNEL_OPTIONS) for _ in range(channels)]
    stubs = [cortex_pb2_grpc.CortexStub(c) for c in pool]
    started = time.perf_counter()
    await asyncio.gather(*(_one_stream(stubs[i % channels], max_tokens, outcome, errors) for i in range(streams)))
    seconds = time.perf_counter() - started
    stop.set()
    for probe in probes.values():
        probe.close()
    sampler.join()
    for channel in pool:
        await channel.close()
    after = {"cortex": rss_bytes(fleet.cortex.pid), "neuron": rss_bytes(fleet.neuron.pid)}
    unexpected = {code: n for code, n in outcome.items() if code not in ("OK", "RESOURCE_EXHAUSTED")}
    return {
        "streams": streams, "channels": channels, "max_tokens": max_tokens, "seconds": round(seconds, 2),
        "outcome": dict(outcome), "unexpected": unexpected, "errors": dict(errors.most_common(8)),
        "health_ms": {name: {"n": len(p.latencies), "p50": round(percentile(p.latencies, 0.5), 2),
                             "p99": round(percentile(p.latencies, 0.99), 2),
                             "max": round(max(p.latencies, default=0), 2), "failures": dict(p.failures)}
                      for name, p in probes.items()},
        "rss_mb": {name: {"start": start_rss[name] >> 20, "peak": peak[name] >> 20, "after": after[name] >> 20}
                   for name in peak},
    }


# ----------------------------------------------------------------------------------------- faults

class StreamsInFlight:
    """`count` long Generate streams through cortex on threads; records when and how each ended."""

    def __init__(self, address: str, count: int, max_tokens: int = 6000):
        self.ended: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._first = threading.Barrier(count + 1)
        self._threads = [threading.Thread(target=self._run, args=(address, max_tokens), daemon=True)
                         for _ in range(count)]
        for t in self._threads:
            t.start()
        self._first.wait(timeout=60)  # every stream has its first token: all are in flight

    def _run(self, address: str, max_tokens: int) -> None:
        channel, stub = sync_stub(address)
        code, signalled = "OK", False
        try:
            stream = stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hello"),
                                                       sampling=cpb.SamplingParams(max_tokens=max_tokens,
                                                                                   ignore_eos=True)), timeout=180)
            for _ in stream:
                if not signalled:
                    signalled = True
                    self._first.wait(timeout=60)
        except grpc.RpcError as err:
            code = err.code().name
        except threading.BrokenBarrierError:
            code = "NO_FIRST_TOKEN"
        finally:
            channel.close()
        with self._lock:
            self.ended.append((time.monotonic(), code))

    def wait(self, timeout: float) -> None:
        for t in self._threads:
            t.join(max(0.0, timeout))


def node_state(address: str) -> int:
    channel, stub = sync_stub(address)
    try:
        nodes = stub.ListNodes(cpb.ListNodesRequest(), timeout=2).nodes
        return nodes[0].state if nodes else -1
    finally:
        channel.close()


def generate_works(address: str) -> bool:
    channel, stub = sync_stub(address)
    try:
        chunks = list(stub.Generate(cpb.GenerateRequest(model="long", prompt=cpb.Prompt(text="hi"),
                                                        sampling=cpb.SamplingParams(max_tokens=2, ignore_eos=True)),
                                    timeout=5))
        return sum(len(c.token_ids) for c in chunks) == 2
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _model_ready(address: str) -> bool:
    channel, stub = sync_stub(address)
    try:
        return any(m.name == "long" and m.state == cpb.MODEL_STATE_READY
                   for m in stub.ListModels(cpb.ListModelsRequest(), timeout=2).models)
    finally:
        channel.close()


def _ensure_long_model(fleet: Fleet) -> None:
    channel, stub = sync_stub(fleet.cortex_address)
    try:
        wait_for(lambda: node_state(fleet.cortex_address) == cpb.NODE_STATE_UP, 60)
        models = {m.name: m.state for m in stub.ListModels(cpb.ListModelsRequest(), timeout=5).models}
        if models.get("long") == cpb.MODEL_STATE_READY:
            return
        if "long" in models:
            stub.UnloadModel(cpb.UnloadModelRequest(name="long"), timeout=30)
        load_model(stub, "long", "long", max_context=8192, kv_slots=8)
    finally:
        channel.close()


def fault(fleet: Fleet, target: str, action: str, streams: int = 3) -> dict:
    """Inject one fault, measure, then restart (kill) or continue (stop) and measure recovery."""
    _ensure_long_model(fleet)
    server = fleet.neuron if target == "neuron" else fleet.cortex
    flight = StreamsInFlight(fleet.cortex_address, streams)
    t0 = time.monotonic()
    os.kill(server.pid, signal.SIGKILL if action == "kill -9" else signal.SIGSTOP)
    result: dict = {"target": target, "fault": action}
    if target == "neuron":
        wait_for(lambda: node_state(fleet.cortex_address) == cpb.NODE_STATE_DOWN, 60)
        result["to_down_s"] = round(time.monotonic() - t0, 2)
    flight.wait(60)
    ends = sorted(flight.ended)
    result["streams_ended_s"] = [round(t - t0, 2) for t, _ in ends]
    result["streams_codes"] = dict(Counter(code for _, code in ends))
    if target == "neuron":
        asked = time.monotonic()
        refused = not generate_works(fleet.cortex_address)
        result["new_request_refused_in_s"] = round(time.monotonic() - asked, 2) if refused else None
    # Recovery: restart (after kill -9) or SIGCONT (after SIGSTOP), until a new Generate works.
    t1 = time.monotonic()
    if action == "kill -9":
        server.kill()
        fleet.start_neuron() if target == "neuron" else fleet.start_cortex()
    else:
        os.kill(server.pid, signal.SIGCONT)
    if target == "neuron":
        wait_for(lambda: node_state(fleet.cortex_address) == cpb.NODE_STATE_UP, 60)
        result["to_up_s"] = round(time.monotonic() - t1, 2)
        if action == "kill -9":  # the restarted neuron has no shard: the model is loaded again
            _ensure_long_model(fleet)
    else:
        wait_for(lambda: _model_ready(fleet.cortex_address), 60)
        result["model_ready_s"] = round(time.monotonic() - t1, 2)
    wait_for(lambda: generate_works(fleet.cortex_address), 90, interval=0.2)
    result["recovered_s"] = round(time.monotonic() - t1, 2)
    return result


def run_faults(fleet: Fleet) -> list[dict]:
    rows = []
    for target in ("neuron", "cortex"):
        for action in ("kill -9", "SIGSTOP"):
            row = fault(fleet, target, action)
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def print_faults(rows: list[dict]) -> None:
    print("\nfault matrix (seconds from the fault; recovery from the restart / SIGCONT)")
    print(f"{'process':8} {'fault':8} {'streams ended':>22} {'codes':>22} {'DOWN':>6} {'refused':>8} "
          f"{'UP/ready':>9} {'recovered':>10}")
    for r in rows:
        ended = r["streams_ended_s"]
        span = f"{min(ended):.2f}-{max(ended):.2f}" if ended else "-"
        codes = ",".join(f"{k}:{v}" for k, v in r["streams_codes"].items())
        print(f"{r['target']:8} {r['fault']:8} {span:>22} {codes:>22} {r.get('to_down_s', '-')!s:>6} "
              f"{r.get('new_request_refused_in_s', '-')!s:>8} {r.get('to_up_s', r.get('model_ready_s', '-'))!s:>9} "
              f"{r['recovered_s']:>10}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("load", "faults"), help="run one part only")
    parser.add_argument("--streams", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=16, help="client channels the streams share")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="cortex's --poll-seconds")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="load-test-"))
    root = workdir / "models"
    write_checkpoint(root / "long", LlamaShape(max_position_embeddings=8192))
    shutil.copytree(MODELS / "llama2", root / "tiny")
    fleet = Fleet(workdir, [root], args.poll_seconds)
    report = {"commit": commit(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "poll_seconds": args.poll_seconds}
    try:
        fleet.start_neuron()
        fleet.start_cortex()
        wait_for(lambda: node_state(fleet.cortex_address) == cpb.NODE_STATE_UP, 60)
        if args.only in (None, "faults"):
            report["faults"] = run_faults(fleet)
            print_faults(report["faults"])
        if args.only in (None, "load"):
            channel, stub = sync_stub(fleet.cortex_address)
            load_model(stub, "tiny", "tiny", kv_slots=64, max_context=256)
            channel.close()
            report["load"] = asyncio.run(run_load(fleet, args.streams, args.channels, args.max_tokens))
            print(json.dumps(report["load"], indent=1))
    finally:
        fleet.stop()
    out = ROOT / "bench" / "results" / f"load_test-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}\nlogs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
