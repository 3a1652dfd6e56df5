"""CPU time each token costs on its way out: Generate streams through a real `cortex serve` and
`neuron serve --devices cpu` on the tiny model (whose forward pass is small), with the CPU seconds
of each process read from /proc before and after each run and divided by the tokens streamed.

    python bench/stream_cost_bench.py [--streams 64] [--tokens 128] [--runs 3]

Throughput on a small machine is noisy (client, cortex and neuron share its cores); CPU microseconds
per token vary less, so this is the figure to hold a change of the token path against (they still
moved 15-20% between runs on the 2-core CI machine). Writes bench/results/stream_cost_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


def cpu_seconds(stat_path: Path) -> float:
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK    # utime + stime


def snapshot(neuron_pid: int, cortex_pid: int) -> dict[str, float]:
    return {"neuron": cpu_seconds(Path(f"/proc/{neuron_pid}/stat")),
            "cortex": cpu_seconds(Path(f"/proc/{cortex_pid}/stat"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny"
        write_checkpoint(path, SHAPES["tiny"], dtype="float32")
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        d = deploy(path, "cpu", "float32", 1024, args.streams, {}, [])
        try:
            rng = np.random.default_rng(0)
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                run_workload(pool, 1, d.cortex.address, d.model, random_prompts(rng, 4, 8, vocab), 8)
                for _ in range(args.runs):
                    prompts = random_prompts(rng, args.streams, args.prompt_tokens, vocab)
                    before, t0 = snapshot(d.neuron.proc.pid, d.cortex.proc.pid), time.perf_counter()
                    measured = run_workload(pool, 1, d.cortex.address, d.model, prompts, args.tokens)
                    after, seconds = snapshot(d.neuron.proc.pid, d.cortex.proc.pid), time.perf_counter() - t0
                    tokens = args.streams * args.tokens
                    row = {k: 1e6 * (after[k] - before[k]) / tokens for k in after}
                    row.update(output_tok_s=measured["output_tok_s"], wall_s=seconds, errors=measured.get("errors", 0))
                    runs.append(row)
                    print("  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        finally:
            d.stop()
    keys = ["neuron", "cortex"]
    median = {k: statistics.median(r[k] for r in runs) for k in keys + ["output_tok_s"]}
    print("CPU us per token (median of runs): " + ", ".join(f"{k} {median[k]:.1f}" for k in keys)
          + f"; {median['output_tok_s']:.0f} tok/s")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"stream_cost_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "cpus": os.cpu_count(), "streams": args.streams,
                               "tokens": args.tokens, "runs": runs, "median_us_per_token": median}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
