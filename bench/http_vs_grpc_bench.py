"""What cortex's HTTP front adds over its gRPC front: the same concurrency sweep through both.

    python bench/http_vs_grpc_bench.py                       # CPU, the llama3 test fixture
    python bench/http_vs_grpc_bench.py --concurrency 1,4,16 --requests 32 --tokens 64

Starts one CPU neuron and one cortex (HTTP on), loads a tiny model, then for each concurrency level
runs the same requests (token-id prompt, greedy, ignore_eos, fixed length) through gRPC Generate
and through POST /v1/completions with stream=true, alternating the fronts round by round so drift
hits both alike. Per request it records TTFT, end-to-end time and the time per token after the
first (all at the client); the HTTP front's added cost is the difference of the medians. It also
reads cortex's CPU time (/proc) around every sweep: CPU milliseconds per request and per token
through each front are what the front costs even on a loaded machine, where wall-clock differences
drown in other processes' noise. Both clients are asyncio (grpc.aio, aiohttp) in this process.
JSON goes to bench/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402

from bench.common import commit  # noqa: E402
from common.proto.cortex.v1 import cortex_pb2 as cpb  # noqa: E402
from common.proto.cortex.v1 import cortex_pb2_grpc  # noqa: E402
from cortex.client import CortexClient  # noqa: E402
from cortex.local import cortex_args, neuron_args, start_server  # noqa: E402

PROMPT = list(range(10, 42))  # 32 token ids


def cpu_ms(pid: int) -> float:
    """User plus system CPU time of a process so far, in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


def http_port(log: str) -> int:
    for line in log.splitlines():
        if line.startswith("{") and '"event": "http serving"' in line:
            return json.loads(line)["port"]
    raise RuntimeError(f"cortex logged no 'http serving' line:\n{log[-2000:]}")


async def grpc_request(stub, model: str, tokens: int) -> dict:
    request = cpb.GenerateRequest(model=model)
    request.prompt.tokens.ids.extend(PROMPT)
    request.sampling.max_tokens, request.sampling.temperature, request.sampling.ignore_eos = tokens, 0.0, True
    started, first, count = time.perf_counter(), None, 0
    async for chunk in stub.Generate(request, timeout=300):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        count += len(chunk.token_ids)
    return _record(started, first, time.perf_counter(), count)


async def http_request(session, base: str, model: str, tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started, first, count = time.perf_counter(), None, 0
    async with session.post(base + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                count = event["usage"]["completion_tokens"]
    return _record(started, first, time.perf_counter(), count)


def _record(started: float, first: float | None, ended: float, count: int) -> dict:
    first = first or ended
    return {"ttft_ms": (first - started) * 1e3, "e2e_ms": (ended - started) * 1e3, "tokens": count,
            "per_token_ms": (ended - first) * 1e3 / (count - 1) if count > 1 else 0.0}


async def sweep_level(call, concurrency: int, requests: int) -> dict:
    queue = list(range(requests))
    records = []

    async def worker():
        while queue:
            queue.pop()
            records.append(await call())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {"records": records, "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in records) / wall}


def summary(records: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in records) for k in ("ttft_ms", "e2e_ms", "per_token_ms")}
    return {**{f"median_{k}": round(v, 3) for k, v in med.items()}, "requests": len(records)}


async def run(args, grpc_address: str, base: str, cortex_pid: int) -> list[dict]:
    rows = []
    async with grpc.aio.insecure_channel(grpc_address) as channel, aiohttp.ClientSession() as session:
        stub = cortex_pb2_grpc.CortexStub(channel)
        fronts = {"grpc": lambda: grpc_request(stub, args.model_name, args.tokens),
                  "http": lambda: http_request(session, base, args.model_name, args.tokens)}
        for front in fronts.values():  # warm-up: connections, first-call paths
            await sweep_level(front, 2, 4)
        for concurrency in args.concurrency:
            collected = {name: [] for name in fronts}
            walls = {name: 0.0 for name in fronts}
            cpu = {name: 0.0 for name in fronts}
            for round_ in range(args.rounds):
                order = list(fronts) if round_ % 2 == 0 else list(reversed(fronts))
                for name in order:
                    before = cpu_ms(cortex_pid)
                    level = await sweep_level(fronts[name], concurrency, args.requests)
                    cpu[name] += cpu_ms(cortex_pid) - before
                    collected[name] += level["records"]
                    walls[name] += level["wall_s"]
            row = {"concurrency": concurrency}
            for name in fronts:
                tokens = sum(r["tokens"] for r in collected[name])
                row[name] = {**summary(collected[name]), "tokens_per_s": round(tokens / walls[name], 1),
                             "cortex_cpu_ms_per_request": round(cpu[name] / len(collected[name]), 3),
                             "cortex_cpu_ms_per_token": round(cpu[name] / tokens, 4)}
            row["http_added_ms_per_request"] = round(row["http"]["median_e2e_ms"] - row["grpc"]["median_e2e_ms"], 3)
            row["http_added_ms_per_token"] = round(row["http"]["median_per_token_ms"]
                                                   - row["grpc"]["median_per_token_ms"], 4)
            row["http_added_ttft_ms"] = round(row["http"]["median_ttft_ms"] - row["grpc"]["median_ttft_ms"], 3)
            row["http_added_cortex_cpu_ms_per_request"] = round(row["http"]["cortex_cpu_ms_per_request"]
                                                                - row["grpc"]["cortex_cpu_ms_per_request"], 3)
            row["http_added_cortex_cpu_ms_per_token"] = round(row["http"]["cortex_cpu_ms_per_token"]
                                                              - row["grpc"]["cortex_cpu_ms_per_token"], 4)
            rows.append(row)
            print(f"c={concurrency:3d}  grpc e2e {row['grpc']['median_e2e_ms']:8.2f} ms  http e2e "
                  f"{row['http']['median_e2e_ms']:8.2f} ms  added/request {row['http_added_ms_per_request']:7.2f} ms"
                  f"  added/token {row['http_added_ms_per_token']:7.4f} ms  cortex CPU/request grpc "
                  f"{row['grpc']['cortex_cpu_ms_per_request']:.2f} http {row['http']['cortex_cpu_ms_per_request']:.2f} ms"
                  f"  tok/s grpc {row['grpc']['tokens_per_s']} http {row['http']['tokens_per_s']}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "tests" / "fixtures" / "models" / "llama3"))
    parser.add_argument("--model-name", default="bench")
    parser.add_argument("--concurrency", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests", type=int, default=8, help="requests per front, level and round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per level, alternating which front goes first")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--kv-slots", type=int, default=8)
    args = parser.parse_args()

    model = Path(args.model).resolve()
    work = Path(tempfile.mkdtemp(prefix="http-bench-"))
    neuron = start_server("neuron", "neuron.cli", neuron_args("cpu", [model.parent]), work, timeout=60)
    servers = [neuron]
    try:
        cortex = start_server("cortex", "cortex.cli", cortex_args([neuron.address], poll_seconds=0.5,
                                                                  http_listen="127.0.0.1:0"), work)
        servers.append(cortex)
        base = f"http://127.0.0.1:{http_port(cortex.logs())}"
        with CortexClient(cortex.address, timeout=60) as client:
            deadline = time.monotonic() + 30
            while not any(n.state == cpb.NODE_STATE_UP for n in client.nodes()):
                if time.monotonic() > deadline:
                    raise RuntimeError("the neuron did not come UP")
                time.sleep(0.1)
            client.load_wait(str(model.name), name=args.model_name, kv_slots=args.kv_slots)
        load_before = os.getloadavg()
        rows = asyncio.run(run(args, cortex.address, base, cortex.pid))
        result = {"bench": "http_vs_grpc", "commit": commit(), "model": str(model), "device": "cpu",
                  "prompt_tokens": len(PROMPT), "tokens": args.tokens, "requests": args.requests,
                  "rounds": args.rounds, "kv_slots": args.kv_slots, "cpu_count": os.cpu_count(),
                  "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "levels": rows}
    finally:
        for server in reversed(servers):
            server.stop()
    out = ROOT / "bench" / "results" / f"http_vs_grpc_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
