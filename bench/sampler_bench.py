"""The batched sampler's time per turn on a GPU for sampling requests (temperature alone, with top-p,
top-k, min-p) at 1 / 64 / 256 rows of a 128k vocabulary: today's sample_rows (top_filter.cu: two
launches, no sort) beside the way it drew before (a stable argsort of every row with top-k or
top-p, CuPy's cumulative sums: `previous_draw` below, kept as the baseline), the all-greedy pick,
and the limit of reading the logits once at the copy bandwidth measured in the same run.

    python -m bench.sampler_bench [--rows 1,64,256] [--vocab 128256] [--out bench/results]

Times are CUDA events around one call, eager (the general sampler does not run in a graph), median
of 20 after warm-up. Writes bench/results/sampler_bench-<time>.json with the commit and GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, copy_bandwidth, gpu_name, time_ms  # noqa: E402
from neuron.runner.sampler import RowSampler, SampleRow, greedy_rows, sample_rows_on_device  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402

SETTINGS = {
    "temperature 1": dict(temperature=1.0),
    "top_p 0.9": dict(temperature=0.8, top_p=0.9),
    "top_k 50": dict(temperature=0.8, top_k=50),
    "top_k 50 + top_p 0.95": dict(temperature=0.8, top_k=50, top_p=0.95),
    "min_p 0.05": dict(temperature=0.8, min_p=0.05),
}


def previous_draw(cp, scores, samplers: list[RowSampler]):
    """The sampler's draw before top_filter.cu (the baseline): with top-k or top-p a stable sort of
    every row, cut and drawn in sorted order; without, a float64 cumulative sum in vocabulary order."""
    n, vocab = scores.shape
    uniforms = np.array([s.rng.random() for s in samplers])
    temperature = np.array([s.config.temperature for s in samplers], dtype=np.float32)[:, None]
    rows = (scores - scores.max(axis=1, keepdims=True)) / cp.asarray(temperature)
    cut = bool(samplers[0].top_k) or samplers[0].config.top_p < 1.0
    order = None
    if cut:
        order = cp.argsort(-rows, axis=1, kind="stable")
        rows = cp.take_along_axis(rows, order, axis=1)
    weights = cp.exp(rows)
    if cut:
        keep = np.array([s.top_k or vocab for s in samplers])[:, None]
        weights = cp.where(cp.arange(vocab)[None, :] < cp.asarray(keep), weights, 0.0)
        top_p = np.array([s.config.top_p for s in samplers])
        if (top_p < 1.0).any():
            cumulative = cp.cumsum(weights, axis=1, dtype=cp.float64)
            kept = (cumulative - weights) < cp.asarray(top_p)[:, None] * cumulative[:, -1:]
            weights = cp.where(cp.asarray(top_p >= 1.0)[:, None] | kept, weights, 0.0)
    min_p = np.array([s.config.min_p for s in samplers], dtype=np.float32)[:, None]
    if (min_p > 0).any():
        weights = cp.where(weights >= cp.asarray(min_p), weights, 0.0)
    cdf = cp.cumsum(weights, axis=1, dtype=cp.float64)
    target = cdf[:, -1] * (1.0 - cp.asarray(uniforms))
    index = (cdf < target[:, None]).sum(axis=1)
    return index if order is None else cp.take_along_axis(order, index[:, None], axis=1)[:, 0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,64,256")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    import cupy as cp

    bandwidth = copy_bandwidth(cp)
    result = {"commit": commit(), "gpu": gpu_name(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "vocab": args.vocab, "copy_gb_s": bandwidth, "rows": []}
    rng = np.random.default_rng(0)
    print(f"copy bandwidth {bandwidth:,.0f} GB/s; vocab {args.vocab:,}; ms a turn (median of 20, eager)")
    print(f"{'rows':>5} {'setting':<24} {'sampler':>10} {'previous':>10} {'greedy':>8} {'limit':>8}")
    for n in [int(r) for r in args.rows.split(",") if r]:
        logits = cp.asarray(rng.standard_normal((n, args.vocab)).astype(np.float32) * 3)
        limit = logits.nbytes / (bandwidth * 1e9) * 1e3
        greedy = time_ms(cp, lambda: greedy_rows(cp, logits, np.arange(n)), reps=20)
        for name, setting in SETTINGS.items():
            config = SamplingConfig(**setting)
            samplers = [RowSampler.create(config, args.vocab) for _ in range(n)]
            rows = [SampleRow(s, j, []) for j, s in enumerate(samplers)]
            new = time_ms(cp, lambda: sample_rows_on_device(cp, logits, rows), reps=20)
            index = np.arange(n)   # the previous path gathered the rows first too
            old = time_ms(cp, lambda: previous_draw(cp, logits[cp.asarray(index)].astype(cp.float32), samplers),
                          reps=20)
            row = {"rows": n, "setting": name, "sample_rows_ms": new, "previous_ms": old, "greedy_ms": greedy,
                   "limit_ms": limit}
            result["rows"].append(row)
            print(f"{n:>5} {name:<24} {new:>10.3f} {old:>10.3f} {greedy:>8.3f} {limit:>8.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampler_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
