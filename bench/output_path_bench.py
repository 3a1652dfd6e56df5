"""CPU time of the neuron's output path per streamed token, in process: sampled-token events of N
generations turned into text and gRPC bytes, once per decode turn, the way GenerateStream does it
(one GenerateStreamResponse per wake-up, text decoded together by `take_all`), beside the per-request
path the Generate RPC takes (one ResponseBuilder.take and one message per generation).

    python bench/output_path_bench.py [--streams 1,64,256] [--turns 200]

The tokenizer is the serving benchmark's (byte-level, 512 merges) and the ids are random, as the
random-weight models of serving_bench sample them. No gRPC call is made: the figure is the Python and
protobuf work before the bytes reach gRPC, which shares the GIL with the device thread in a neuron.
Writes bench/results/output_path_bench-<time>.json with the commit.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import commit  # noqa: E402
from bench.make_checkpoint import write_checkpoint  # noqa: E402
from bench.serving_bench import SHAPES  # noqa: E402
from common.proto.neuron.v1 import neuron_pb2 as pb  # noqa: E402
from neuron.generation import TokenEvent  # noqa: E402
from neuron.service.responses import ResponseBuilder, take_all  # noqa: E402
from neuron.tokenizer import TextStream, Tokenizer  # noqa: E402


def one_call(builders, events) -> bytes:
    """GenerateStream: one response for every generation's events of the turn, written in place."""
    response = pb.GenerateStreamResponse()

    def message_for(index: int) -> pb.GenerateResponse:
        update = response.updates.add()
        update.id = index
        return update.response

    take_all(list(zip(builders, events)), message_for)
    return response.SerializeToString()


def per_request(builders, events) -> bytes:
    """Generate: one message per generation."""
    return b"".join(b.take(e).SerializeToString() for b, e in zip(builders, events))


def run(tokenizer: Tokenizer, streams: int, turns: int, path) -> float:
    """Microseconds of CPU per token over `turns` turns of one token per stream."""
    rng = random.Random(streams)
    builders = [ResponseBuilder(f"req-{i:012d}", 128, TextStream(tokenizer, [])) for i in range(streams)]
    ids = [[rng.randrange(tokenizer.vocab_size) for _ in range(streams)] for _ in range(turns)]
    started = time.process_time()
    for turn in range(turns):
        path(builders, [[TokenEvent(token, 0.0)] for token in ids[turn]])
    return (time.process_time() - started) / (turns * streams) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,64,256")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), SHAPES["tiny"], dtype="float32")
        tokenizer = Tokenizer.from_dir(tmp)
    rows = []
    for n in [int(s) for s in args.streams.split(",")]:
        row = {"streams": n}
        for name, path in (("generate_stream_us", one_call), ("per_request_us", per_request)):
            row[name] = statistics.median(run(tokenizer, n, args.turns, path) for _ in range(args.runs))
        rows.append(row)
        print(f"{n:>4} streams: GenerateStream {row['generate_stream_us']:.2f} us of CPU per token, "
              f"per-request Generate {row['per_request_us']:.2f} us (median of {args.runs} runs)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"output_path_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"commit": commit(), "turns": args.turns, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
