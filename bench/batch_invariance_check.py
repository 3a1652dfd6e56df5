"""Which part of the GPU engine makes a request's greedy tokens differ batched (arriving one by one
through the device worker) from alone: each fixture prompt set run alone and then staggered, with
decode graphs on/off and prefix caching on/off, on one shard. Prints, per variant, how many prompts
agree and at which output index the first disagreement sits.

    python bench/batch_invariance_check.py [--fixtures llama3,qwen3] [--dtype float32]
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.gpu_checks import FIXTURES, drop, generate, generate_async, load, start_worker, wait


def cases(name: str) -> list[list[int]]:
    ref = np.load(FIXTURES / "reference" / f"{name}_batch.npz")
    return [p.tolist() for p in np.split(ref["prompt_ids"], np.cumsum(ref["prompt_lengths"])[:-1])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", default="llama3,qwen3")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    worker = start_worker(0)
    try:
        for name in args.fixtures.split(","):
            handle, shard = load(worker, FIXTURES / "models" / name, args.dtype, max_context=256, max_seqs=16)
            graphs = shard.engine.runner.graphs
            blocks = shard.engine.scheduler.block_manager
            for use_graphs in (True, False):
                for caching in (True, False):
                    shard.engine.runner.graphs = graphs if use_graphs else None
                    blocks.enable_prefix_caching = caching
                    prompts = cases(name)
                    alone = [generate(worker, handle, p, args.tokens) for p in prompts]
                    batched = [wait(c) for c in [generate_async(worker, handle, p, args.tokens) for p in prompts]]
                    first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                             for x, y in zip(alone, batched)]
                    same = sum(f is None for f in first)
                    print(f"{name} {args.dtype} graphs={use_graphs} prefix_caching={caching}: batched == alone "
                          f"{same}/{len(prompts)}; first differing index per prompt {first}", flush=True)
            shard.engine.runner.graphs = graphs
            drop(worker, handle)
    finally:
        worker.stop()


if __name__ == "__main__":
    main()
