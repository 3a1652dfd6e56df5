"""Where a shared-prefix burst's time to first token goes, in process (no gRPC): one request with
the common prefix first (untimed, so the prefix is cached), then `--streams` requests of that
prefix plus `--suffix` distinct tokens submitted at once. Prints every turn until each request has
its first token: its kind, tokens, wall and device milliseconds (CUDA events), and how many
requests then have their first token; beside it one prompt turn of the same token count without a
cached prefix, the same run's weight-read and matmul limits.

    python bench/prefix_turn_bench.py [--models 1b,8b] [--streams 32] [--prefix 2048] [--suffix 64]
    python bench/prefix_turn_bench.py --device cpu --models cpu-512 --prefix 512 --streams 8

Writes prefix_turn_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, commit, copy_bandwidth, gpu_name
from bench.engine_bench import MODELS, TurnLog, load, matmul_rate
from bench.make_checkpoint import SHAPES, write_checkpoint
from neuron.device import CpuBackend, CudaBackend, DeviceSpec
from neuron.engine.core import Caller
from neuron.engine.request import Request
from neuron.sampling import SamplingConfig


def submit(shard, prompts: list[list[int]], tag: str) -> list[Request]:
    requests = []
    for i, prompt in enumerate(prompts):
        request = Request(f"{tag}{i}", prompt, SamplingConfig(max_tokens=2, ignore_eos=True), shard.kv.max_context)
        shard.engine.add(request, Caller(emit=lambda event: None))
        requests.append(request)
    return requests


def first_tokens(shard, log: TurnLog, requests: list[Request]) -> list[dict]:
    """Steps the engine until every request has a token; one row a turn."""
    log.turns.clear()
    rows, started = [], time.perf_counter()
    while shard.engine.has_work() and not all(r.output_ids for r in requests):
        shard.engine.step()
        for kind, tokens, seconds, device, _ in log.turns[len(rows):]:
            rows.append({"kind": kind, "tokens": tokens, "wall_ms": 1e3 * seconds,
                         "device_ms": None if device is None else 1e3 * device,
                         "since_submit_ms": 1e3 * (time.perf_counter() - started),
                         "with_first_token": sum(1 for r in requests if r.output_ids)})
    while shard.engine.has_work():   # the second tokens, so the next burst starts on an idle engine
        shard.engine.step()
    return rows


def run_model(backend, model: str, args) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if MODELS.get(model) in SHAPES:
            shape = SHAPES[MODELS[model]]
            write_checkpoint(tmp, shape)
        else:  # the CPU shapes
            from bench.serving_bench import SHAPES as SERVING_SHAPES
            shape = SERVING_SHAPES[model]
            write_checkpoint(tmp, shape, dtype="float32")
        context = args.prefix + args.suffix + 8
        shard = load(backend, Path(tmp), model, backend.kind == "cuda", args.streams, max_context=context)
        log = TurnLog(shard.engine.runner)
        shard.engine.runner = log
        vocab = shard.model.config.vocab_size
        prefix = rng.integers(3, vocab, args.prefix).tolist()
        suffixes = [rng.integers(3, vocab, args.suffix).tolist() for _ in range(args.streams)]
        warm = rng.integers(3, vocab, args.suffix).tolist()
        first_tokens(shard, log, submit(shard, [prefix + warm], "warm"))
        before = shard.engine.scheduler.stats().kv
        cached = first_tokens(shard, log, submit(shard, [prefix + s for s in suffixes], "hit"))
        # the same tokens a turn without a prefix to hit: fresh prompts of the suffix's length
        after = shard.engine.scheduler.stats().kv
        plain = first_tokens(shard, log, submit(shard, [rng.integers(3, vocab, args.suffix).tolist()
                                                        for _ in range(args.streams)], "plain"))
        for name, rows in (("cached prefix", cached), ("no prefix", plain)):
            for row in rows:
                device = "" if row["device_ms"] is None else f" device {row['device_ms']:8.2f} ms"
                print(f"{model:>5} {name:>13}: {row['kind']:>6} turn, {row['tokens']:5d} tokens, wall "
                      f"{row['wall_ms']:8.2f} ms{device}, at {row['since_submit_ms']:8.2f} ms "
                      f"{row['with_first_token']:3d}/{args.streams} have a token", flush=True)
        print(f"{model:>5} prefix cache: {after.hits - before.hits} of the burst's "
              f"{after.queries - before.queries} prompt tokens were hits")
        return {"model": model, "cached_prefix_turns": cached, "no_prefix_turns": plain,
                "prompt_tokens": after.queries - before.queries, "hit_tokens": after.hits - before.hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--suffix", type=int, default=64)
    parser.add_argument("--device", default="0", help="CUDA GPU index, or cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.device == "cpu":
        backend, name, limits = CpuBackend(DeviceSpec("cpu", "cpu", 0), 16 << 30), "cpu", {}
    else:
        backend = CudaBackend(DeviceSpec(args.device, "cuda", int(args.device)))
        name = gpu_name()
        limits = {"copy_gb_s": copy_bandwidth(backend.xp), "matmul_tflops": matmul_rate(backend.xp)}
        print(f"device: {name}   copy {limits['copy_gb_s']:.0f} GB/s   matmul {limits['matmul_tflops']:.1f} TFLOP/s")
    result = {"bench": "prefix_turn_bench", "commit": commit(), "gpu": name, **limits, "streams": args.streams,
              "prefix": args.prefix, "suffix": args.suffix,
              "models": [run_model(backend, m, args) for m in args.models.split(",")]}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"prefix_turn_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
