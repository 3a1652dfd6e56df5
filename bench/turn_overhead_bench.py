"""Host time of one engine turn outside the model: what the device thread spends per decode turn in
Python (schedule, flatten the plan, batched-sampler bookkeeping, update), with the model and the
device taken out, at 1, 64 and 256 running requests.

    python bench/turn_overhead_bench.py [--requests 1,64,256] [--turns 200]

The device thread's own objects run (Scheduler, ModelRunner.execute: the plan flattened, the batched
sampler, update) around a fake model that returns fixed logits (vocabulary 32, so the sampler's
array work is negligible); each request has a 128-token prompt and decodes greedily without
stopping. The figure is the median wall time of a decode turn in microseconds, split into schedule,
execute (everything but the model) and update; beside it the median of a whole `ShardEngine.step`
(async scheduling, cancellation checks and the events posted to each caller included), and the time
the GPU needs per decode step of the 8B shape at that batch (weights + KV at the H200's measured
~4.2 TB/s copy rate): the host budget a turn must stay under for the GPU not to wait on it.
Writes bench/results/turn_overhead_bench-<time>.json with the commit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from neuron.engine.core import Caller, ShardEngine  # noqa: E402
from neuron.engine.kv_blocks import KVBlockManager  # noqa: E402
from neuron.engine.request import Request  # noqa: E402
from neuron.engine.scheduler import Scheduler  # noqa: E402
from neuron.runner.model_runner import ModelRunner  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402

VOCAB = 32
BLOCK = 16
H200_COPY_GB_S = 4200.0          # measured copy bandwidth of the H200 (bench/NOTES.md)
WEIGHTS_8B = 16.06e9             # bytes of the 8B shape in bf16
KV_PER_TOKEN_8B = 2 * 32 * 8 * 128 * 2


class FixedLogits:
    """Stands in for LlamaModel: the runner's work around the model, none of the model's."""
    xp = np
    decode_attention = None

    def forward_batch(self, token_ids, positions, meta, kv, rows):
        return None if rows is None else np.zeros((len(rows), VOCAB), dtype=np.float32)


class BlockSize:
    block_size = BLOCK


def one_run(n: int, turns: int, prompt: int) -> dict:
    manager = KVBlockManager(num_blocks=n * (prompt + turns + BLOCK) // BLOCK + 8, block_size=BLOCK)
    scheduler = Scheduler(manager, max_batched_tokens=max(2048, n * prompt), max_seqs=max(n, 1))
    rng = np.random.default_rng(0)
    for i in range(n):
        scheduler.add(Request(f"r{i}", rng.integers(0, VOCAB, prompt).tolist(),
                              SamplingConfig(max_tokens=10**6, ignore_eos=True), max_context=prompt + turns + 64))
    runner = ModelRunner(FixedLogits(), BlockSize(), VOCAB)
    phases: dict[str, list[float]] = {"schedule": [], "execute": [], "update": [], "turn": []}
    for turn in range(turns + 1):
        t0 = time.perf_counter()
        plan = scheduler.schedule()
        t1 = time.perf_counter()
        out = runner.execute(plan)
        t2 = time.perf_counter()
        scheduler.update(plan, out)
        t3 = time.perf_counter()
        if turn == 0:
            continue  # the prefill turn
        for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            phases[name].append(value * 1e6)
    context = prompt + turns / 2
    gpu_us = (WEIGHTS_8B + n * context * KV_PER_TOKEN_8B) / (H200_COPY_GB_S * 1e9) * 1e6
    return {"requests": n, **{f"{k}_us": statistics.median(v) for k, v in phases.items()}, "gpu_step_8b_us": gpu_us}


class Sink:
    """Where a GenerateStream's callers post (neuron/service/generate_stream.py's Inbox, without
    the event loop): a lock and a list."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: list = []

    def post_many(self, items: list) -> None:
        with self._lock:
            self.items += items


def engine_run(n: int, turns: int, prompt: int) -> dict:
    """A whole ShardEngine.step per turn, as the device thread runs it (async scheduling on, so the
    next decode turn is planned and launched before this one's update; aborted callers checked;
    events posted to each request's caller)."""
    manager = KVBlockManager(num_blocks=n * (prompt + turns + BLOCK) // BLOCK + 8, block_size=BLOCK)
    scheduler = Scheduler(manager, max_batched_tokens=max(2048, n * prompt), max_seqs=max(n, 1))
    engine = ShardEngine(scheduler, ModelRunner(FixedLogits(), BlockSize(), VOCAB), async_scheduling=True)
    rng = np.random.default_rng(0)
    sink = Sink()
    for i in range(n):
        engine.add(Request(f"r{i}", rng.integers(0, VOCAB, prompt).tolist(),
                           SamplingConfig(max_tokens=10**6, ignore_eos=True), max_context=prompt + turns + 64),
                   Caller(sink=sink, key=i))   # as a GenerateStream generation
    steps = []
    for turn in range(turns + 1):
        t0 = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - t0) * 1e6)
        sink.items.clear()
    return {"requests": n, "engine_step_us": statistics.median(steps[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default="1,64,256")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    rows = [{**one_run(int(n), args.turns, args.prompt), **engine_run(int(n), args.turns, args.prompt)}
            for n in args.requests.split(",")]
    print(f"{'requests':>8} {'schedule':>9} {'execute':>8} {'update':>8} {'turn us':>8} {'engine step us':>15}"
          "   8B GPU step us")
    for r in rows:
        print(f"{r['requests']:>8} {r['schedule_us']:>9.0f} {r['execute_us']:>8.0f} {r['update_us']:>8.0f} "
              f"{r['turn_us']:>8.0f} {r['engine_step_us']:>15.0f}   {r['gpu_step_8b_us']:>8.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"turn_overhead_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit(), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
