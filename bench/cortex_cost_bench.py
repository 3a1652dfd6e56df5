"""cortex's CPU per streamed token, with no GPU: a real `cortex serve` routing Generate streams to a
stand-in neuron that answers GenerateStream at a fixed turn rate, one token per generation per turn
(what a neuron's decode turns look like from cortex), so cortex is the process under load.

    python bench/cortex_cost_bench.py [--streams 64,256] [--turn-ms 4] [--tokens 128]

The stand-in (`--serve-stand-in`, started by this script in its own process) reports one shard
through Describe, which cortex adopts as model "stand-in", and sends every open generation one
token per `--turn-ms` in one GenerateStream message. At 256 streams and 4 ms turns it offers 64,000
tokens a second, more than one cortex core can forward, so cortex's figures are its ceiling on this
machine: CPU microseconds per token and its busy share (1.0 = one core), the tokens per client
message (above 1 when cortex fell behind and merged a generation's queued tokens), and the
throughput the clients saw. The clients run in their own processes (`--client-procs`). `--floor`
runs the same workloads against a bare grpc.aio server of Generate (no interceptors, routing or
neuron: what gRPC itself costs per call and per message here) and prints cortex beside it. Writes
bench/results/cortex_cost_bench-<time>.json with the commit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.serving_bench import run_workload  # noqa: E402
from bench.stream_cost_bench import busiest_threads, cpu_seconds, thread_seconds  # noqa: E402

MODEL = "stand-in"
VOCAB = 32000


def serve_on_loopback(add_servicer, port_file: Path) -> None:
    """A grpc.aio server of one servicer on a free loopback port, written to port_file; runs until killed."""
    import grpc

    async def serve() -> None:
        server = grpc.aio.server()
        add_servicer(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_file.write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


def stand_in_main(port_file: Path, turn_seconds: float) -> None:
    """The stand-in neuron: Describe with one adoptable shard, GenerateStream at a fixed turn rate."""

    from common.proto.neuron.v1 import neuron_pb2 as pb
    from common.proto.neuron.v1 import neuron_pb2_grpc

    shard = pb.ShardSummary(handle=1, model=MODEL, dtype="bfloat16", tp_size=1, path="/stand-in",
                            architecture="LlamaForCausalLM", max_context=4096, vocab_size=VOCAB)
    device = pb.Device(id="0", kind="cuda", name="stand-in", total_bytes=80 << 30, free_bytes=40 << 30,
                       shards=[shard])

    class StandIn(neuron_pb2_grpc.NeuronServicer):
        async def Describe(self, request, context):
            return pb.DescribeResponse(host="stand-in", version="bench", backend="none", devices=[device])

        async def GenerateStream(self, request_iterator, context):
            open_: dict[int, list] = {}    # id -> [tokens left, tokens sent, request id, prompt tokens]

            async def read():
                async for message in request_iterator:
                    if message.cancel:
                        open_.pop(message.id, None)
                    elif message.HasField("start"):
                        start = message.start
                        open_[message.id] = [start.sampling.max_tokens or 16, 0, start.request_id,
                                             len(start.prompt.tokens.ids)]

            reader = asyncio.create_task(read())
            try:
                while not (reader.done() and not open_):
                    await asyncio.sleep(turn_seconds)
                    if not open_:
                        continue
                    response = pb.GenerateStreamResponse()
                    for key, state in list(open_.items()):
                        update = response.updates.add()
                        update.id = key
                        message = update.response
                        message.token_ids.append(7)
                        message.text = "x"
                        message.request_id = state[2]
                        state[1] += 1
                        if state[1] >= state[0]:
                            message.finish_reason = pb.FINISH_REASON_LENGTH
                            message.stop_reason = "max_tokens"
                            message.usage.prompt_tokens, message.usage.completion_tokens = state[3], state[1]
                            del open_[key]
                    yield response
            finally:
                reader.cancel()

    serve_on_loopback(lambda server: neuron_pb2_grpc.add_NeuronServicer_to_server(StandIn(), server), port_file)


def floor_main(port_file: Path, turn_seconds: float) -> None:
    """The floor: a bare grpc.aio server of cortex's Generate (no interceptors, no routing, no
    neuron), one token a message every turn; its CPU per call and per token is what gRPC and the
    messages cost this machine, the part of cortex's cost no change to cortex's Python removes."""

    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.cortex.v1 import cortex_pb2_grpc

    class Floor(cortex_pb2_grpc.CortexServicer):
        async def Generate(self, request, context):
            tokens = request.sampling.max_tokens or 16
            for sent in range(1, tokens + 1):
                await asyncio.sleep(turn_seconds)
                message = cpb.GenerateResponse(token_ids=[7], text="x", request_id="floor")
                if sent == tokens:
                    message.finish_reason = cpb.FINISH_REASON_LENGTH
                    message.usage.prompt_tokens = len(request.prompt.tokens.ids)
                    message.usage.completion_tokens = tokens
                yield message

    serve_on_loopback(lambda server: cortex_pb2_grpc.add_CortexServicer_to_server(Floor(), server), port_file)


def start_stand_in(turn_ms: float, work: Path, role: str = "--serve-stand-in") -> tuple[subprocess.Popen, str]:
    port_file = work / f"{role.strip('-')}.port"
    proc = subprocess.Popen([sys.executable, __file__, role, str(port_file), "--turn-ms", str(turn_ms)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {role.strip('-')} server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def wait_adopted(address: str) -> None:
    import grpc

    from common.proto.cortex.v1 import cortex_pb2 as cpb
    from common.proto.cortex.v1 import cortex_pb2_grpc
    from tests.helpers import wait_until

    with grpc.insecure_channel(address) as channel:
        stub = cortex_pb2_grpc.CortexStub(channel)
        wait_until(lambda: any(m.name == MODEL and m.state == cpb.MODEL_STATE_READY
                               for m in stub.ListModels(cpb.ListModelsRequest()).models),
                   timeout=60, what=f"cortex adopting the stand-in's model {MODEL!r}")


def measure(pool, server: str, pid: int, address: str, streams: list[int], ids: list[int], args) -> list[dict]:
    """`args.runs` workloads of n streams each against the server at `address`, its CPU read from /proc."""
    run_workload(pool, 1, address, MODEL, [ids] * 2, 8)   # warm-up
    rows = []
    for n in streams:
        for _ in range(args.runs):
            threads_before, before = thread_seconds(pid), cpu_seconds(Path(f"/proc/{pid}/stat"))
            measured = run_workload(pool, min(args.client_procs, n), address, MODEL, [ids] * n, args.tokens)
            after, threads_after = cpu_seconds(Path(f"/proc/{pid}/stat")), thread_seconds(pid)
            tokens = measured["output_tokens"]
            row = {"server": server, "streams": n, "us_per_token": 1e6 * (after - before) / tokens,
                   "us_per_call": 1e6 * (after - before) / n, "busy": (after - before) / measured["seconds"],
                   "threads_busy": busiest_threads(threads_before, threads_after, measured["seconds"]),
                   "tokens_per_message": tokens / measured["messages"], "output_tok_s": measured["output_tok_s"],
                   "offered_tok_s": n * 1e3 / args.turn_ms, "errors": measured["errors"]}
            rows.append(row)
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="64,256")
    parser.add_argument("--turn-ms", type=float, default=4.0, help="the stand-in's turn: one token per stream each")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=4,
                        help="prompt ids per request (the stand-in ignores them; cortex converts and forwards them): "
                             "with --tokens 1, us_per_call is its cost of taking a request in")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--stream-interval", type=int, default=1, help="cortex's --stream-interval")
    parser.add_argument("--max-stream-interval", type=int, default=None,
                        help="cortex's --max-stream-interval (default: cortex's own; 1: the interval never rises)")
    parser.add_argument("--floor", action="store_true",
                        help="also run the same workloads against a bare grpc.aio Generate server (the floor)")
    parser.add_argument("--serve-stand-in", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.serve_stand_in is not None:
        stand_in_main(args.serve_stand_in, args.turn_ms / 1e3)
        return 0
    if args.serve_floor is not None:
        floor_main(args.serve_floor, args.turn_ms / 1e3)
        return 0

    from tests.helpers import start_cortex

    streams = [int(n) for n in args.streams.split(",")]
    ids = [(7 + 13 * i) % VOCAB for i in range(args.prompt_tokens)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.client_procs, mp_context=get_context("spawn")) as pool:
        stand_in, neuron_address = start_stand_in(args.turn_ms, Path(tmp))
        cortex = None
        try:
            extra = ["--stream-interval", str(args.stream_interval)]
            if args.max_stream_interval is not None:
                extra += ["--max-stream-interval", str(args.max_stream_interval)]
            cortex = start_cortex([neuron_address], extra=extra)
            wait_adopted(cortex.address)
            runs += measure(pool, "cortex", cortex.proc.pid, cortex.address, streams, ids, args)
        finally:
            if cortex is not None:
                cortex.terminate()
            stand_in.kill()
            stand_in.wait()
        if args.floor:
            floor, address = start_stand_in(args.turn_ms, Path(tmp), "--serve-floor")
            try:
                runs += measure(pool, "floor", floor.pid, address, streams, ids, args)
            finally:
                floor.kill()
                floor.wait()
    keys = ["us_per_token", "us_per_call", "busy", "tokens_per_message", "output_tok_s"]
    servers = ["cortex"] + (["floor"] if args.floor else [])
    median = {server: {n: {k: statistics.median(r[k] for r in runs if r["streams"] == n and r["server"] == server)
                           for k in keys} for n in streams} for server in servers}
    for n in streams:
        m = median["cortex"][n]
        floor = (f" against a bare grpc.aio Generate server's {median['floor'][n]['us_per_token']:.1f} per token "
                 f"({median['floor'][n]['us_per_call']:.0f} per call)" if args.floor else "")
        print(f"{n} streams, median of runs: cortex {m['us_per_token']:.1f} us of CPU per token "
              f"({m['us_per_call']:.0f} per call){floor}, busy {m['busy']:.2f}, {m['tokens_per_message']:.2f} "
              f"tokens a message, {m['output_tok_s']:.0f} tok/s (offered {n * 1e3 / args.turn_ms:.0f})")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cortex_cost_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "cpus": os.cpu_count(), "turn_ms": args.turn_ms,
                               "stream_interval": args.stream_interval,
                               "max_stream_interval": args.max_stream_interval, "prompt_tokens": args.prompt_tokens,
                               "tokens": args.tokens, "runs": runs, "median_by_streams": median}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
