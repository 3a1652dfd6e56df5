"""Where the device thread's time goes in each decode turn on a GPU, in process (no gRPC): the host
time of each phase of `ShardEngine.step`, and the device time of the graph replay alone, timed by
CUDA events around it in the real loop (sustained turns, the KV laid out as serving lays it out).

    python bench/turn_phase_bench.py [--models 1b,8b] [--streams 256] [--tokens 128]

Phases (median microseconds per call, and per step): `schedule_ahead` (the next turn planned while
this one runs), `launch` (build_batch, the graph's uploads and replay, the sampler, the ids' copy
back), `finish` (mostly the wait for the device), `update` (the scheduler's bookkeeping) and
`post_all` (the events to the callers). Beside them the replay's device time and the gap between
replays: a gap near zero with `finish` waiting means the device is the limit. turn_profile's lone
replay (serving_bench's profile) is beside it in serving_bench's output; a sustained replay that
is slower than the lone one is device time, not host time. Writes
bench/results/turn_phase_bench-<time>.json with the commit.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit, gpu_name, write_result  # noqa: E402
from bench.engine_bench import MODELS, load, run_requests  # noqa: E402
from bench.make_checkpoint import SHAPES, write_checkpoint  # noqa: E402

PHASES = [("neuron.engine.core", "ShardEngine", "step", "step"),
          ("neuron.engine.core", "ShardEngine", "_post_all", "post_all"),
          ("neuron.engine.scheduler", "Scheduler", "schedule_ahead", "schedule_ahead"),
          ("neuron.engine.scheduler", "Scheduler", "update", "update"),
          ("neuron.runner.model_runner", "ModelRunner", "launch", "launch"),
          ("neuron.runner.model_runner", "ModelRunner", "finish", "finish"),
          ("neuron.runner.model_runner", "ModelRunner", "_sample", "launch.sample"),
          ("neuron.runner.model_runner", None, "build_batch", "launch.build_batch"),
          ("neuron.runner.model_runner", "IdsCopyBack", "queue", "launch.copy_back"),
          ("neuron.runner.cuda_graphs", "DecodeGraphs", "run_greedy", "launch.graphs_run_greedy"),
          ("neuron.runner.cuda_graphs", "DecodeGraphs", "run", "launch.graphs_run"),
          ("neuron.runner.graph_inputs", "GraphInputs", "stage", "run.stage"),
          ("neuron.runner.graph_inputs", "GraphInputs", "upload", "run.upload"),
          ("neuron.runner.cuda_graphs", None, "feed_tokens", "run.feed_tokens")]


class PhaseTimer:
    """Wraps each phase's function while `on`: wall seconds per call, by phase."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    def wrap(self, owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label].append(time.perf_counter() - started)
        setattr(owner, name, timed)

    def summary(self) -> dict:
        steps = max(1, len(self.seconds.get("step", ())))
        return {label: {"calls": len(v), "us_p50": round(1e6 * statistics.median(v), 1),
                        "us_per_step": round(1e6 * sum(v) / steps, 1)}
                for label, v in sorted(self.seconds.items()) if v}


class ReplayEvents:
    """CUDA events around every graph replay while `on`."""

    def __init__(self, cuda_graphs):
        self.on, self.pairs = False, []
        replay = cuda_graphs.DecodeGraphs._replay

        def timed(graphs, bucket):
            if not self.on:
                return replay(graphs, bucket)
            cp = graphs.xp
            before = cp.cuda.Event()
            before.record()
            out = replay(graphs, bucket)
            after = cp.cuda.Event()
            after.record()
            self.pairs.append((before, after))
            return out
        cuda_graphs.DecodeGraphs._replay = timed

    def summary(self, cp) -> dict:
        cp.cuda.Device().synchronize()
        replay = [cp.cuda.get_elapsed_time(a, b) for a, b in self.pairs]
        gaps = [cp.cuda.get_elapsed_time(self.pairs[i][1], self.pairs[i + 1][0]) for i in range(len(self.pairs) - 1)]
        return {"replays": len(replay), "replay_ms_p50": round(statistics.median(replay), 3),
                "gap_ms_p50": round(statistics.median(gaps), 3) if gaps else None}


def main() -> int:
    import importlib

    from neuron.device import CudaBackend, DeviceSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--device", default="0")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    timer = PhaseTimer()
    for module, cls, name, label in PHASES:
        owner = importlib.import_module(module)
        timer.wrap(getattr(owner, cls) if cls else owner, name, label)
    events = ReplayEvents(importlib.import_module("neuron.runner.cuda_graphs"))
    backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
    result = {"commit": commit(), "gpu": gpu_name(), "streams": args.streams, "prompt": args.prompt,
              "tokens": args.tokens, "models": {}}
    for model in args.models.split(","):
        n = args.streams
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, SHAPES[MODELS[model]])
            shard = load(backend, Path(tmp), model, True, n, max_context=2048)
            rng = np.random.default_rng(0)
            # distinct prompts each run: a repeated one would be a prefix-cache hit, its prefill skipped
            batches = [[rng.integers(10, 1000, args.prompt).tolist() for _ in range(n)] for _ in range(3)]
            run_requests(shard, batches[0], args.tokens)   # warm-up
            timer.on = True
            _, seconds = run_requests(shard, batches[1], args.tokens)
            timer.on = False
            events.on = True
            run_requests(shard, batches[2], args.tokens)
            events.on = False
            row = {"tok_s": n * args.tokens / seconds, "phases": timer.summary(), "device": events.summary(backend.xp)}
            timer.seconds.clear()
            events.pairs.clear()
            result["models"][model] = row
            print(f"{model} x{n}: {row['tok_s']:.0f} tok/s (phases timed); replay {row['device']}")
            for label, v in row["phases"].items():
                print(f"  {label:20s} calls {v['calls']:5d}  p50 {v['us_p50']:9.1f} us   per step {v['us_per_step']:9.1f} us")
            shard.engine.fail_all(RuntimeError("bench done"))
            del shard
            backend.release_cached()
    write_result(args.out, "turn_phase_bench", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
