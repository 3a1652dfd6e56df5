"""CPU batching benchmark: aggregate output tokens/s of 1 and of 16 concurrent Generate streams,
through a real `neuron serve --devices cpu` behind `cortex serve`, on a random-weight model of hidden
512 and 6 layers (float32). The ratio is what continuous batching buys on the CPU: one stream per
step reads all the weights for one token; a batch reads them once for every stream.

    python bench/cpu_batch_bench.py                       # 1 vs 16 streams, 64 tokens each
    python bench/cpu_batch_bench.py --streams 1,4,16 --tokens 32

Writes bench/results/cpu_batch_bench-<time>.json with the commit.
"""
from __future__ import annotations

import argparse
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

from bench.common import commit  # noqa: E402
from bench.make_checkpoint import write_checkpoint  # noqa: E402
from bench.serving_bench import SHAPES, deploy, device_name, log, random_prompts, run_workload  # noqa: E402

MODEL = "cpu-512"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16", help="concurrent streams per measurement")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per stream count; the best is kept")
    parser.add_argument("--neuron-arg", action="append", default=[], help="extra `neuron serve` flag (repeatable)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "neuron-serving-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",") if s]

    shape = SHAPES[MODEL]
    path = Path(args.work) / f"{MODEL}-float32"
    if not (path / "config.json").exists():
        log(f"writing {path}: {write_checkpoint(path, shape, 'float32')}")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    result = {"commit": commit(), "device": device_name("cpu"), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "args": vars(args), "model": {"shape": MODEL, "hidden_size": shape.hidden_size,
                                            "num_layers": shape.num_layers, "vocab_size": vocab}, "runs": {}}
    d = deploy(path, "cpu", "float32", args.prompt_tokens + args.tokens + 16, max(streams), {}, args.neuron_arg)
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            run_workload(pool, 1, d.cortex.address, d.model, random_prompts(rng, 1, args.prompt_tokens, vocab), 4)
            for n in streams:
                runs = [run_workload(pool, 1, d.cortex.address, d.model,
                                     random_prompts(rng, n, args.prompt_tokens, vocab), args.tokens)
                        for _ in range(args.repeats)]
                result["runs"][n] = {"best_tok_s": max(r.get("output_tok_s") or 0.0 for r in runs), "all": runs}
                log(f"  {n} streams: {result['runs'][n]['best_tok_s']:.1f} tok/s (runs: "
                    f"{[round(r.get('output_tok_s') or 0.0, 1) for r in runs]}, errors "
                    f"{sum(r.get('errors', 0) for r in runs)})")
    finally:
        d.stop()
    one = result["runs"][streams[0]]["best_tok_s"]
    lines = [f"{MODEL} (hidden {shape.hidden_size}, {shape.num_layers} layers, vocab {vocab}, float32) on "
             f"{result['device']}, commit {result['commit'][:12]}, {args.tokens} tokens per stream, through cortex",
             f"{'streams':>8s} {'tok/s':>9s} {'x ' + str(streams[0]) + ' stream':>12s}"]
    for n in streams:
        best = result["runs"][n]["best_tok_s"]
        result["runs"][n]["ratio"] = best / one if one else None
        lines.append(f"{n:8d} {best:9.1f} {best / one if one else 0.0:11.2f}x")
    result["table"] = "\n".join(lines)
    print("\n" + result["table"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"cpu_batch_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    file.write_text(json.dumps(result, indent=2, default=float) + "\n")
    log(f"wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
