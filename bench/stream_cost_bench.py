"""CPU time each token costs on its way out: Generate streams through a real `cortex serve` and
`neuron serve --devices cpu` on the tiny model (whose forward pass is small), with the CPU seconds
of each process read from /proc before and after each run and divided by the tokens streamed.

    python bench/stream_cost_bench.py [--streams 64] [--tokens 128] [--runs 3]
    python bench/stream_cost_bench.py --device 0 --shape 1b --streams 64,256   # on a GPU

Beside the microseconds per token each run reports each process's busy share (CPU seconds / wall
seconds over the span the streams ran; 1.0 = one core saturated): a process near 1.0 is the one holding the stream back.

Each run also gives the busy shares of each process's busiest threads: Python threads share one GIL,
so a neuron whose device thread and event loop sum to ~1.0 is held by its GIL.

Throughput on a small machine is noisy (client, cortex and neuron share its cores); CPU microseconds
per token vary less, so this is the figure to hold a change of the token path against (they still
moved 15-20% between runs on the 2-core CI machine). Writes bench/results/stream_cost_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.make_checkpoint import write_checkpoint  # noqa: E402
from bench.serving_bench import SHAPES, deploy, random_prompts, run_workload  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
SPY_RATE = 250   # py-spy samples a second


def cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK    # utime + stime


def snapshot(neuron_pid: int, cortex_pid: int) -> dict[str, float]:
    return {"neuron": cpu_seconds(Path(f"/proc/{neuron_pid}/stat")),
            "cortex": cpu_seconds(Path(f"/proc/{cortex_pid}/stat"))}


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of a process, by thread id."""
    seconds = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            seconds[int(task.name)] = cpu_seconds(task / "stat")
        except (FileNotFoundError, ProcessLookupError):   # the thread ended meanwhile
            pass
    return seconds


def busiest_threads(before: dict[int, float], after: dict[int, float], seconds: float, top: int = 4) -> list[float]:
    """The busy shares of a process's busiest threads over a run. Python threads share one GIL: when
    the Python ones sum to ~1.0 the process is held by the GIL, whatever its total."""
    shares = sorted(((after[t] - before.get(t, 0.0)) / seconds for t in after), reverse=True)
    return [round(share, 3) for share in shares[:top]]


def record(directory: Path, streams: int, pids: dict[str, int], gil: bool = False) -> list[subprocess.Popen]:
    """py-spy sampling each process (all threads, idle ones left out) until `stop`; `gil`: only
    the thread holding the GIL, so samples / (rate x seconds) is the share of time it is held."""
    directory.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", str(SPY_RATE), "--threads",
                              "--nonblocking", *(["--gil"] if gil else []),
                              "--format", "raw", "-o", str(directory / f"{name}-{streams}.txt")],
                             stdout=subprocess.DEVNULL, stderr=open(directory / f"{name}-{streams}.log", "w"))
            for name, pid in pids.items()]


def stop(spies: list[subprocess.Popen]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)   # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="64", help="comma-separated stream counts")
    parser.add_argument("--device", default="cpu", help="cpu, or a CUDA GPU index")
    parser.add_argument("--shape", default="tiny", help=f"checkpoint shape (1b, 8b on a GPU), of {','.join(SHAPES)}")
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--cortex-arg", action="append", default=[],
                        help="extra `cortex serve` flag (repeatable), e.g. --cortex-arg=--stream-interval=2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--small-tokenizer", action="store_true",
                        help="the small (368-token) tokenizer of runs before session 12 (see serving_bench)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="record each process with py-spy (on PATH) over the last run of each stream count: "
                             "collapsed stacks per thread in DIR/{neuron,cortex}-<streams>.txt")
    parser.add_argument("--py-spy-gil", action="store_true",
                        help="with --py-spy: sample only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    runs = []
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    streams = [int(n) for n in args.streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / args.shape
        write_checkpoint(path, SHAPES[args.shape], dtype=dtype, small_tokenizer=args.small_tokenizer)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        d = deploy(path, args.device, dtype, 1024, max(streams), {}, [], args.cortex_arg)
        try:
            rng = np.random.default_rng(0)
            with ProcessPoolExecutor(args.client_procs, mp_context=get_context("spawn")) as pool:
                run_workload(pool, args.client_procs, d.cortex.address, d.model, random_prompts(rng, 4, 8, vocab), 8)
                for n in streams:
                    for run in range(args.runs):
                        prompts = random_prompts(rng, n, args.prompt_tokens, vocab)
                        spies = (record(args.py_spy, n, {"neuron": d.neuron.proc.pid, "cortex": d.cortex.proc.pid},
                                        args.py_spy_gil)
                                 if args.py_spy and run == args.runs - 1 else [])
                        pids = {"neuron": d.neuron.proc.pid, "cortex": d.cortex.proc.pid}
                        threads_before = {k: thread_seconds(pid) for k, pid in pids.items()}
                        before, t0 = snapshot(d.neuron.proc.pid, d.cortex.proc.pid), time.perf_counter()
                        measured = run_workload(pool, args.client_procs, d.cortex.address, d.model, prompts,
                                                args.tokens)
                        after, seconds = snapshot(d.neuron.proc.pid, d.cortex.proc.pid), time.perf_counter() - t0
                        threads_after = {k: thread_seconds(pid) for k, pid in pids.items()}
                        stop(spies)
                        tokens = n * args.tokens
                        row = {"streams": n, **{k: 1e6 * (after[k] - before[k]) / tokens for k in after},
                               # over the streaming span (the run's wall time includes the clients' start wait)
                               **{f"{k}_busy": (after[k] - before[k]) / measured["seconds"] for k in after}}
                        row.update(output_tok_s=measured["output_tok_s"], wall_s=seconds,
                                   errors=measured.get("errors", 0),
                                   **{f"{k}_threads_busy": busiest_threads(threads_before[k], threads_after[k],
                                                                           measured["seconds"]) for k in pids})
                        runs.append(row)
                        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)
        finally:
            d.stop()
    keys = ["neuron", "cortex", "neuron_busy", "cortex_busy", "output_tok_s"]
    median = {n: {k: statistics.median(r[k] for r in runs if r["streams"] == n) for k in keys} for n in streams}
    for n, m in median.items():
        print(f"{n} streams, median of runs: CPU us per token neuron {m['neuron']:.1f}, cortex {m['cortex']:.1f}; "
              f"busy neuron {m['neuron_busy']:.2f}, cortex {m['cortex_busy']:.2f}; {m['output_tok_s']:.0f} tok/s")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"stream_cost_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "cortex_args": args.cortex_arg,
                               "tokenizer": "small" if args.small_tokenizer else "covering",
                               "cpus": os.cpu_count(), "device": args.device, "shape": args.shape,
                               "streams": streams, "tokens": args.tokens, "runs": runs,
                               "median_by_streams": median}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
