"""CPU continuous-batching benchmark: aggregate decode tokens/s of N concurrent greedy streams
against one stream, through the device worker and its engine (no gRPC), on a random-weight model of
hidden 512 and 6 layers in float32. Issue 12 asks 16 streams for >= 4x one stream's tokens/s.

    python bench/cpu_batching_bench.py [--streams 1,4,16] [--tokens 64] [--prompt 32]

Prints a table and writes bench/results/cpu_batching_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from cortex.tiny_checkpoint import LlamaShape, write_checkpoint  # noqa: E402
from neuron.device import DeviceSpec  # noqa: E402
from neuron.engine.core import Caller  # noqa: E402
from neuron.engine.request import Request  # noqa: E402
from neuron.generation import FinishEvent, TokenEvent  # noqa: E402
from neuron.sampling import SamplingConfig  # noqa: E402
from neuron.shard import LoadRequest  # noqa: E402
from neuron.worker import DeviceWorker, GenerateJob, LoadShardJob  # noqa: E402

SHAPE = LlamaShape(hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8, num_kv_heads=8,
                   max_position_embeddings=1024)


def run(worker: DeviceWorker, handle: int, shard, streams: int, tokens: int, prompt_len: int) -> dict:
    done = threading.Barrier(streams + 1)
    first, last = [], []

    def collector():
        times = []

        def emit(event):
            if isinstance(event, TokenEvent):
                times.append(event.sampled_at)
            elif isinstance(event, FinishEvent):
                first.append(times[0])
                last.append(times[-1])
                threading.Thread(target=done.wait).start()
        return emit

    started = time.perf_counter()
    for s in range(streams):
        prompt = [(7 * s + 3 * i) % 400 + 5 for i in range(prompt_len)]
        request = Request(f"bench-{streams}-{s}", prompt, SamplingConfig(max_tokens=tokens, ignore_eos=True),
                          shard.kv.max_context)
        worker.submit(GenerateJob(handle, request, Caller(emit=collector()))).result()
    done.wait()
    wall = max(last) - started
    decode = max(last) - min(first)
    return {"streams": streams, "tokens_per_stream": tokens, "prompt_tokens": prompt_len,
            "aggregate_tok_s": streams * tokens / wall,
            "decode_tok_s": streams * (tokens - 1) / decode if decode > 0 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp) / "m", SHAPE)
        worker = DeviceWorker(DeviceSpec("cpu", "cpu", 0), 8 << 30)
        worker.start()
        try:
            shard = worker.submit(LoadShardJob(LoadRequest(Path(tmp) / "m", "bench", max_context=512), 1,
                                               lambda p: None, threading.Event())).result()
            run(worker, 1, shard, 1, 8, args.prompt)  # warm-up
            rows = [run(worker, 1, shard, int(n), args.tokens, args.prompt) for n in args.streams.split(",")]
        finally:
            worker.stop()
    base = rows[0]["aggregate_tok_s"]
    print(f"{'streams':>8} {'aggregate tok/s':>16} {'decode tok/s':>13} {'x one stream':>13}")
    for row in rows:
        row["speedup_vs_first"] = row["aggregate_tok_s"] / base
        print(f"{row['streams']:>8} {row['aggregate_tok_s']:>16.1f} {row['decode_tok_s']:>13.1f} "
              f"{row['speedup_vs_first']:>13.2f}")
    out = ROOT / "bench" / "results" / f"cpu_batching_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "shape": "hidden 512, 6 layers, 8 heads, fp32",
                               "command": " ".join(sys.argv), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
