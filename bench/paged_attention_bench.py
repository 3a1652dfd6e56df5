"""Paged decode attention on one GPU: the kernel (neuron/kernels/paged_attention.cu) against the
plain CuPy gather path the engine falls back to, beside the HBM limit measured in the same run.

    python bench/paged_attention_bench.py [--out DIR]

One layer of an 8B-shaped cache (8 kv heads, head_dim 128, 32 query heads, bf16, block size 16) at
batch 1, 64 and 256 and contexts 128 to 8192. The limit is the K and V bytes read at the measured
copy bandwidth (reads only: half of copy_bandwidth's read+write figure would be too low, so the
copy figure itself is the ceiling). Writes paged_attention_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from bench.common import ROOT, commit, copy_bandwidth, gpu_name, time_ms
from neuron.kernels.paged_attention import PagedAttentionCuda, num_splits


def gather_attention(cp, q, k_cache, v_cache, tables, lens, scale, max_ctx):
    """The plain path: gather every sequence's blocks, masked softmax in float32."""
    batch, q_heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    blocks = math.ceil(max_ctx / block_size)
    keys = k_cache[tables[:, :blocks]].reshape(batch, blocks * block_size, kv_heads, d).astype(cp.float32)
    values = v_cache[tables[:, :blocks]].reshape(batch, blocks * block_size, kv_heads, d).astype(cp.float32)
    qf = q.astype(cp.float32).reshape(batch, kv_heads, group, d)
    scores = cp.einsum("bhgd,bjhd->bhgj", qf, keys) * scale
    mask = cp.arange(blocks * block_size)[None, :] >= lens[:, None]
    scores = cp.where(mask[:, None, None, :], -cp.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    p = cp.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return cp.einsum("bhgj,bjhd->bhgd", p, values).reshape(batch, q_heads, d).astype(q.dtype)


def measure(cp, kernel, batch: int, ctx: int, bandwidth: float, kv_heads: int = 8, group: int = 4, d: int = 128,
            block_size: int = 16) -> dict:
    dt, item = ml_dtypes.bfloat16, 2
    blocks_per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * blocks_per_seq
    rng = np.random.default_rng(0)
    k = cp.asarray(rng.standard_normal((num_blocks, block_size, kv_heads, d), dtype=np.float32)).astype(dt)
    v = cp.asarray(rng.standard_normal((num_blocks, block_size, kv_heads, d), dtype=np.float32)).astype(dt)
    tables = cp.asarray(rng.permutation(num_blocks).astype(np.int32).reshape(batch, blocks_per_seq))
    lens = cp.full((batch,), ctx, dtype=cp.int32)
    q = cp.asarray(rng.standard_normal((batch, kv_heads * group, d), dtype=np.float32)).astype(dt)
    splits = num_splits(ctx)
    out = cp.empty_like(q)
    ws = kernel.workspace(batch, kv_heads * group, splits)
    scale = d ** -0.5
    us = 1e3 * time_ms(cp, lambda: kernel.decode(q, k, v, tables, lens, scale, 0, splits, out=out, workspace=ws),
                       reps=20)
    nbytes = 2 * batch * ctx * kv_heads * d * item
    gather_us = None
    if 2 * batch * ctx * kv_heads * d * (item + 8) < 24e9:  # the gather path's float32 copies fit
        got = gather_attention(cp, q, k, v, tables, lens, scale, ctx).astype(cp.float32)
        err = float(cp.linalg.norm(got - out.astype(cp.float32)) / cp.linalg.norm(got))
        assert err < 2e-2, f"kernel and gather path disagree: rel L2 {err}"
        gather_us = 1e3 * time_ms(cp, lambda: gather_attention(cp, q, k, v, tables, lens, scale, ctx), reps=5)
    return {"batch": batch, "context": ctx, "kernel_us": us, "kernel_gb_s": nbytes / us / 1e3,
            "gather_us": gather_us, "limit_us": nbytes / bandwidth / 1e3, "bytes": nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--contexts", default="128,1024,8192")
    args = parser.parse_args()
    import cupy as cp

    kv_heads, group, d = 8, 4, 128
    bandwidth = copy_bandwidth(cp)
    kernel = PagedAttentionCuda("bfloat16", d, group)
    rows = []
    print(f"GPU: {gpu_name()}   copy {bandwidth:.0f} GB/s   (8B layer: {kv_heads} kv heads x {group}, d {d}, bf16)")
    print(f"{'batch':>5} {'context':>7} {'kernel us':>10} {'GB/s':>7} {'% copy':>7} {'gather us':>10} {'limit us':>9}")
    for batch in [int(b) for b in args.batches.split(",")]:
        for ctx in [int(c) for c in args.contexts.split(",")]:
            row = measure(cp, kernel, batch, ctx, bandwidth)
            rows.append(row)
            gather = "-" if row["gather_us"] is None else f"{row['gather_us']:.1f}"
            print(f"{batch:>5} {ctx:>7} {row['kernel_us']:>10.1f} {row['kernel_gb_s']:>7.0f} "
                  f"{100 * row['kernel_gb_s'] / bandwidth:>6.0f}% {gather:>10} {row['limit_us']:>9.1f}")
            cp.get_default_memory_pool().free_all_blocks()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"paged_attention_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit(), "gpu": gpu_name(), "copy_gb_s": bandwidth, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
