"""Running streams' inter-token latency while a long prompt is admitted, with prompt chunks capped
(`--max-prefill-chunk`) and uncapped, on one device, in process (no gRPC).

    python bench/long_prompt_bench.py [--device cpu|0] [--streams 8] [--long 4096] [--caps 128,256,0]

`--streams` requests decode steadily; after `--warm` turns a `--long`-token prompt arrives. Every
turn gives each running stream one token, so a turn's wall time is their inter-token latency. The
table gives p50 and p99 of the turns from the long prompt's arrival until its first token, and its
time to first token, per cap (0: only the turn's token budget, 2,048, bounds a chunk). Writes
long_prompt_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.make_checkpoint import SHAPES, write_checkpoint  # noqa: E402
from neuron.device import CpuBackend, CudaBackend, DeviceSpec  # noqa: E402
from neuron.engine.core import Caller  # noqa: E402
from neuron.engine.request import Request  # noqa: E402
from neuron.engine.settings import EngineSettings  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402
from neuron.shard import LoadRequest, load_shard  # noqa: E402


def measure(backend, directory: Path, cap: int, args, mixed_graphs: bool = True) -> dict:
    import threading
    settings = EngineSettings(max_seqs=args.streams + 1, max_prefill_chunk=cap, kv_memory_fraction=0.5,
                              mixed_graphs=mixed_graphs)
    dtype = "float32" if backend.kind == "cpu" else "bfloat16"
    shard = load_shard(backend, LoadRequest(directory=directory, model="bench", dtype=dtype,
                                            max_context=args.long + 256 if args.long + 256 <= 4096 else 4096, max_seqs=args.streams + 1),
                       1, lambda p: None, threading.Event(), settings=settings)
    rng = np.random.default_rng(0)
    engine = shard.engine
    for i in range(args.streams):
        engine.add(Request(f"s{i}", rng.integers(10, 1000, 32).tolist(),
                           SamplingConfig(max_tokens=10**5, ignore_eos=True), shard.kv.max_context), Caller(emit=lambda e: None))
    for _ in range(args.warm):
        engine.step()
    steady = []
    for _ in range(args.warm):
        t = time.perf_counter()
        engine.step()
        steady.append(time.perf_counter() - t)
    long = Request("long", rng.integers(10, 1000, args.long).tolist(), SamplingConfig(max_tokens=1, ignore_eos=True),
                   shard.kv.max_context)
    arrived = time.perf_counter()
    engine.add(long, Caller(emit=lambda e: None))
    during = []
    while not long.output_ids:
        t = time.perf_counter()
        engine.step()
        during.append(time.perf_counter() - t)
    ttft = time.perf_counter() - arrived
    engine.fail_all(RuntimeError("bench done"))
    return {"cap": cap, "mixed_graphs": mixed_graphs, "steady_itl_p50_ms": 1e3 * float(np.median(steady)),
            "itl_p50_ms": 1e3 * float(np.percentile(during, 50)), "itl_p99_ms": 1e3 * float(np.percentile(during, 99)),
            "turns": len(during), "long_ttft_ms": 1e3 * ttft,
            "during_ms": [round(1e3 * t, 3) for t in during]}   # each turn's wall time, in order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="", help="checkpoint shape (default: cpu-512 on cpu, llama-3-8b on a GPU)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long", type=int, default=3584, help="prompt tokens (the CPU shape holds 4,096 positions)")
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--caps", default="128,256,0", help="prompt-chunk caps to compare (128: the default)")
    parser.add_argument("--mixed-graphs", choices=("on", "off", "both"), default="both",
                        help="the neuron's mixed_graphs setting (GPU: the admission's turns replayed from graphs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.device == "cpu":
        from bench.serving_bench import SHAPES as SERVING_SHAPES
        backend, shape, dtype = CpuBackend(DeviceSpec("cpu", "cpu", 0), 16 << 30), SERVING_SHAPES[args.shape or "cpu-512"], "float32"
    else:
        backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
        shape, dtype = SHAPES[args.shape or "llama-3-8b"], "bfloat16"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, shape, dtype=dtype)
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.mixed_graphs]
        for cap, mixed in [(int(c), m) for c in args.caps.split(",") for m in modes]:
            rows.append(measure(backend, Path(tmp), cap, args, mixed))
            r = rows[-1]
            print(f"cap {cap:>5} mixed graphs {'on ' if mixed else 'off'}: steady ITL p50 {r['steady_itl_p50_ms']:.1f} ms; while the {args.long}-token prompt is "
                  f"admitted ({r['turns']} turns) ITL p50 {r['itl_p50_ms']:.1f} p99 {r['itl_p99_ms']:.1f} ms "
                  f"(p99/steady p50 {r['itl_p99_ms'] / r['steady_itl_p50_ms']:.1f}x); its TTFT {r['long_ttft_ms']:.0f} ms",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"long_prompt_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit(), "device": args.device, "streams": args.streams, "long": args.long,
                                "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
