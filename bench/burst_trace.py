"""Where a shared-prefix burst's time to first token goes, through cortex over gRPC: the
serving_bench shared-prefix workload (one untimed request with the common prefix, then --streams
prompts of it plus --suffix distinct tokens at once), repeated --bursts times, with a tracer loaded
into the neuron and cortex processes (bench/burst_trace_site/sitecustomize.py) that stamps each
request's path and each turn of the device thread on the host's one monotonic clock.

    python -m bench.burst_trace [--model 1b] [--bursts 6] [--streams 32] [--prefix 2048] [--suffix 64]
    python -m bench.burst_trace --device cpu --model tiny --prefix 1920 --bursts 2      # CPU smoke run

Per burst it prints, in ms from the first client submission: the device thread's turns (launch and
the wait for the device, with each turn's requests and tokens), the garbage collections of
generation 1 and 2 in either process, and for each stamp across the burst's requests the first,
median and last time: c_in (cortex has the request), n_start (the neuron reads it from cortex's
stream), n_submit (checked, handed to the device thread), n_add (added to the scheduler, between
turns), c_first (cortex has its first token). Writes bench/results/burst_trace-<time>.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.serving_bench as sb  # noqa: E402
from bench.common import commit, gpu_name  # noqa: E402

SITE = ROOT / "bench" / "burst_trace_site"
STAMPS = ("c_in", "n_start", "n_submit", "n_add0", "c_first")   # one per request


def run_bursts(args, trace_prefix: Path) -> list[dict]:
    pythonpath = os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")])
    sb.ENV.update({"DIAG_TRACE": str(trace_prefix), "DIAG_ROLE": "cortex", "PYTHONPATH": pythonpath})
    path, vocab = sb.random_checkpoint(args.model, args.device)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    max_context = args.prefix + args.suffix + args.tokens + 16
    d = sb.deploy(path, args.device, dtype, max_context, 256, {"DIAG_ROLE": "neuron"}, [])
    pool = ProcessPoolExecutor(max_workers=args.procs, mp_context=get_context("spawn"))
    rng = np.random.default_rng(0)
    prefix = sb.shared_prefix(vocab, args.prefix)
    bursts = []
    try:
        sb.run_workload(pool, 1, d.cortex.address, d.model, sb.random_prompts(rng, 1, args.suffix, vocab, prefix), 1)
        for _ in range(args.bursts):
            prompts = sb.random_prompts(rng, args.streams, args.suffix, vocab, prefix)
            start_at = time.monotonic() + 1.0 + 0.02 * len(prompts)
            futures = [pool.submit(sb.client_process, d.cortex.address, d.model, prompts[i::args.procs], args.tokens,
                                   start_at, {}) for i in range(args.procs)]
            streams = [s for f in futures for s in f.result()]
            bursts.append({"submitted": [s["submitted"] for s in streams],
                           "first": [s["arrivals"][0][0] for s in streams if s["arrivals"]],
                           "summary": sb.summarize(streams, args.tokens)})
            time.sleep(0.5)
    finally:
        d.stop()
        pool.shutdown()
    time.sleep(1.5)   # the tracers' last flush
    return bursts


def read_events(trace_prefix: Path) -> list[tuple]:
    events = []
    for name in glob.glob(f"{trace_prefix}-*.jsonl"):
        pid = name.rsplit("-", 1)[1].split(".")[0]
        events += [(t, pid, event, fields) for t, _, event, fields in map(json.loads, open(name))]
    return sorted(events, key=lambda e: e[0])


def device_turns(inside: list[tuple]) -> list[dict]:
    """The device thread's turns: when each was launched, its size, its launch and its wait."""
    turns, turn = [], None
    for ms, _, event, fields in inside:
        if event == "n_launch0":
            turn = {"at_ms": ms, **fields}
        elif turn is None:
            continue
        elif event == "n_launch1":
            turn["launch_ms"] = ms - turn["at_ms"]
        elif event == "n_fin0":
            turn["wait_from_ms"] = ms
        elif event == "n_fin1" and "wait_from_ms" in turn:
            turn["device_wait_ms"] = ms - turn.pop("wait_from_ms")
            turns.append(turn)
            turn = None
    return turns


def timeline(bursts: list[dict], trace_prefix: Path) -> list[dict]:
    events = read_events(trace_prefix)
    out = []
    for i, burst in enumerate(bursts):
        t0, t1 = min(burst["submitted"]), max(burst["first"]) + 0.002
        inside = [(1e3 * (t - t0), pid, event, fields) for t, pid, event, fields in events if t0 - 0.001 <= t <= t1]
        stamps = {}
        for ms, _, event, _ in inside:
            if event in STAMPS:
                stamps.setdefault(event, []).append(ms)
        collections = [{"at_ms": ms, "pid": pid, **fields} for ms, pid, event, fields in inside if event == "gc"]
        summary, turns = burst["summary"], device_turns(inside)
        print(f"burst {i}: TTFT p50 {summary['ttft_p50_ms']:.1f} ms, p99 {summary['ttft_p99_ms']:.1f}, the neuron's "
              f"own p50 {summary['node_ttft_p50_ms']:.1f}, clients' submit spread {summary['submit_spread_ms']:.1f}")
        for c in collections:
            print(f"  {c['at_ms']:8.2f}  gc generation {c['gen']} in process {c['pid']}: {c['ms']:.2f} ms")
        for turn in turns:
            print(f"  {turn['at_ms']:8.2f}  turn of {turn['chunks']:3d} requests ({turn['prompt_chunks']:3d} prompt "
                  f"chunks), {turn['tokens']:5d} tokens: launch {turn.get('launch_ms', 0):6.2f} ms, then "
                  f"{turn['device_wait_ms']:6.2f} waiting for the device")
        for event in STAMPS:
            values = sorted(stamps.get(event, []))
            if values:
                print(f"  {event:9s} first {values[0]:7.2f}  median {values[len(values) // 2]:7.2f}  "
                      f"last {values[-1]:7.2f}  ({len(values)} requests)")
        out.append({"summary": summary, "turns": turns, "gc": collections,
                    "stamps_ms": {k: [round(v, 3) for v in sorted(vs)] for k, vs in stamps.items()}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sb.add_shared_prefix_args(parser, tokens=8)
    parser.add_argument("--bursts", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        trace_prefix = Path(work) / "trace"
        bursts = timeline(run_bursts(args, trace_prefix), trace_prefix)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"burst_trace-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"bench": "burst_trace", "commit": commit(), "gpu": "cpu" if args.device == "cpu"
                                else gpu_name(), "args": {k: str(v) for k, v in vars(args).items()},
                                "bursts": bursts}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
