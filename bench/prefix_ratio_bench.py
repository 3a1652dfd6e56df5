"""How steady serving_bench's shared-prefix TTFT ratio is: its shared-prefix workload (one untimed
request with the common prefix, then --streams prompts of that prefix plus --suffix distinct
tokens at once, through cortex) repeated --repeats times on one deployment with prefix caching on
and again on one with it off (NEURON_PREFIX_CACHING=0). serving_bench runs each once; this prints
every repeat's TTFT p50 and the ratio of the medians (and of the best and worst repeats).

    python -m bench.prefix_ratio_bench [--model 1b] [--repeats 5]
    python -m bench.prefix_ratio_bench --device cpu --model tiny --prefix 1920 --repeats 2   # CPU smoke run

Writes bench/results/prefix_ratio_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.serving_bench as sb  # noqa: E402
from bench.common import commit, gpu_name  # noqa: E402


def repeats(args, path: Path, vocab: int, caching: bool, pool) -> list[dict]:
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    env = {} if caching else {"NEURON_PREFIX_CACHING": "0"}
    max_context = args.prefix + args.suffix + args.tokens + 16
    d = sb.deploy(path, args.device, dtype, max_context, 256, env, [])
    rng = np.random.default_rng(1)
    prefix = sb.shared_prefix(vocab, args.prefix)
    runs = []
    try:
        sb.run_workload(pool, 1, d.cortex.address, d.model, sb.random_prompts(rng, 1, args.suffix, vocab, prefix), 1)
        for i in range(args.repeats):
            m = sb.run_workload(pool, args.procs, d.cortex.address, d.model,
                                sb.random_prompts(rng, args.streams, args.suffix, vocab, prefix), args.tokens)
            print(f"caching {'on ' if caching else 'off'} repeat {i}: TTFT p50 {m['ttft_p50_ms']:7.1f} ms, "
                  f"p99 {m['ttft_p99_ms']:7.1f}, the neuron's own p50 {m['node_ttft_p50_ms']:7.1f}", flush=True)
            runs.append({k: m.get(k) for k in ("ttft_p50_ms", "ttft_p99_ms", "node_ttft_p50_ms", "output_tok_s",
                                               "errors")})
    finally:
        d.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sb.add_shared_prefix_args(parser, tokens=128)   # serving_bench's output length
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    path, vocab = sb.random_checkpoint(args.model, args.device)
    with ProcessPoolExecutor(max_workers=args.procs, mp_context=get_context("spawn")) as pool:
        on, off = repeats(args, path, vocab, True, pool), repeats(args, path, vocab, False, pool)
    p50_on, p50_off = [r["ttft_p50_ms"] for r in on], [r["ttft_p50_ms"] for r in off]
    ratio = statistics.median(p50_off) / statistics.median(p50_on)
    print(f"TTFT p50 with caching on: median {statistics.median(p50_on):.1f} ms (best {min(p50_on):.1f}, worst "
          f"{max(p50_on):.1f}); off: median {statistics.median(p50_off):.1f} ms. Ratio of the medians {ratio:.2f}x "
          f"(best on {statistics.median(p50_off) / min(p50_on):.2f}x, worst on "
          f"{statistics.median(p50_off) / max(p50_on):.2f}x)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"prefix_ratio_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"bench": "prefix_ratio_bench", "commit": commit(),
                               "gpu": "cpu" if args.device == "cpu" else gpu_name(),
                               "args": {k: str(v) for k, v in vars(args).items()}, "caching_on": on,
                               "caching_off": off, "ratio_of_medians": ratio}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
