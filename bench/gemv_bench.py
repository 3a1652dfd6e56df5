"""The decode GEMV alone, at the shapes of the 8B (TP=1 and each rank of TP=2) and of the 1B: each
build of the kernel, timed as the step runs it (a CUDA graph of one launch per layer, every layer
its own weights, so no launch finds its matrix in the L2), in one process on one GPU, beside the
copy bandwidth measured in the same run.

    python bench/gemv_bench.py [--out DIR]      # needs a GPU and CuPy

Builds: reg (weights loaded into registers, the norm-prologue GEMVs at 80 registers, 3 blocks per
SM: the kernel before sm_90), auto (the default: weights bulk-copied into shared memory by a
producer warp, 16 consumer warps per block, for rows of at most 8 KiB; two rows per unit under 8
KiB; registers for longer rows) and pairs8k (auto with two rows per unit up to 8 KiB rows). Every layer has its own norm weight, as in the model. Each build's
result is checked against reg's on the same inputs (relative L2 error; all sum in the same order,
so 0). Prints a table and writes gemv_bench-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import copy_bandwidth  # noqa: E402

# (model, role, rows of W, K, prologue, epilogue, launches per step)
SHAPES = [
    ("8b-tp2", "qkv", 3072, 4096, "resid_rms", "store", 32),
    ("8b-tp2", "o", 4096, 2048, "none", "partial", 32),
    ("8b-tp2", "gate_up", 2 * 7168, 4096, "resid_rms", "silu_pair", 32),
    ("8b-tp2", "down", 4096, 7168, "none", "partial", 32),
    ("8b-tp2", "lm_head", 64128, 4096, "resid_rms", "logits", 1),
    ("8b-tp1", "qkv", 6144, 4096, "rms", "store", 32),
    ("8b-tp1", "o", 4096, 4096, "none", "resid", 32),
    ("8b-tp1", "gate_up", 2 * 14336, 4096, "rms", "silu_pair", 32),
    ("8b-tp1", "down", 4096, 14336, "none", "resid", 32),
    ("8b-tp1", "lm_head", 128256, 4096, "rms", "logits", 1),
    ("1b-tp1", "qkv", 3072, 2048, "rms", "store", 16),
    ("1b-tp1", "o", 2048, 2048, "none", "resid", 16),
    ("1b-tp1", "gate_up", 2 * 8192, 2048, "rms", "silu_pair", 16),
    ("1b-tp1", "down", 2048, 8192, "none", "resid", 16),
    ("1b-tp1", "lm_head", 128256, 2048, "rms", "logits", 1),
]
# build -> CudaOps arguments
VARIANTS = {"reg": dict(bulk="never"), "auto": dict(bulk="auto"), "pairs8k": dict(bulk="auto", bulk_pair_below=8193)}


def time_graph(cp, fn, reps: int = 15) -> float:
    """Median ms of one replay of a graph capturing fn()."""
    stream = cp.cuda.get_current_stream()
    fn()
    stream.synchronize()
    stream.begin_capture()
    fn()
    graph = stream.end_capture()
    graph.upload(stream)
    for _ in range(3):
        graph.launch(stream)
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        graph.launch(stream)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def random_bf16(cp, shape, lo_exp: int = 118, hi_exp: int = 124):
    """Random bf16 values (random sign and mantissa, exponents lo..hi: no zeros, NaN or inf), made
    on the device."""
    import ml_dtypes
    n = int(np.prod(shape))
    sign = cp.random.randint(0, 2, n, dtype=cp.uint32) << 15
    exp = cp.random.randint(lo_exp, hi_exp + 1, n, dtype=cp.uint32) << 7
    man = cp.random.randint(0, 128, n, dtype=cp.uint32)
    return (sign | exp | man).astype(cp.uint16).view(np.dtype(ml_dtypes.bfloat16)).reshape(shape)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_shape(cp, builds: dict, model, role, n, k, pro, epi, layers) -> dict:
    import ml_dtypes
    bf16 = np.dtype(ml_dtypes.bfloat16)
    count = layers if layers > 1 else 2  # lm_head: 2 copies alternate (each far larger than the L2)
    Ws = [random_bf16(cp, (n, k)) for _ in range(count)]
    x = random_bf16(cp, (k,), 124, 128)
    norms = [random_bf16(cp, (k,), 125, 127) for _ in range(count)] if pro != "none" else [None] * count
    resid = (cp.random.standard_normal(k, dtype=cp.float32) if pro == "resid_rms" else None)
    xout = cp.empty(k, dtype=bf16) if pro == "resid_rms" else None
    n_out = n // 2 if epi == "silu_pair" else n
    f32 = epi in ("logits", "partial")
    out = None if f32 else cp.empty(n_out, dtype=bf16)
    outf = cp.empty(n_out, dtype=cp.float32) if f32 else None
    res = {"model": model, "role": role, "n": n, "k": k, "pro": pro, "epi": epi, "launches_per_step": layers,
           "bytes_per_launch": n * k * 2, "variants": {}}
    res["plans"] = {name: builds[name].gemv_plan(n_out, k, 2, pro, epi) for name in VARIANTS}
    ref = None
    for name, ops in builds.items():
        def run(i, ops=ops):
            ops.gemv(Ws[i % count], x, out, pro, epi, norm_w=norms[i % count], eps=1e-5, outf=outf, resid=resid,
                     xout=xout)
        # check against the first build on the first matrix (out reset first: "resid" adds into it)
        if out is not None:
            out.view(cp.uint16).fill(0)
        if outf is not None:
            outf.fill(np.nan)
        run(0)
        got = (outf if f32 else out).get().astype(np.float32)
        if ref is None:
            ref = got
        err = rel(got, ref)
        ms = time_graph(cp, lambda: [run(i) for i in range(layers)])
        us = ms * 1e3 / layers
        res["variants"][name] = {"us_per_launch": us, "gb_s": n * k * 2 / (us * 1e-6) / 1e9, "rel_err_vs_reg": err}
    Ws.clear()
    cp.get_default_memory_pool().free_all_blocks()
    return res


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--device", type=int, default=0)
    args = parser.parse_args()
    import cupy as cp
    from neuron.kernels.fused_gemv import CudaOps
    t0 = time.time()
    dev = cp.cuda.Device(args.device)
    dev.use()
    stream = cp.cuda.Stream(non_blocking=True)
    results = []
    with stream:
        builds = {name: CudaOps("bfloat16", **kw) for name, kw in VARIANTS.items()}
        for ops in builds.values():
            ops.compile_all()
        ops = builds["reg"]
        props = cp.cuda.runtime.getDeviceProperties(args.device)
        copy_gb_s = copy_bandwidth(cp)
        print(f"GPU {props['name'].decode()}, {ops.sm_count} SMs, L2 {props.get('l2CacheSize', 0) / 2**20:.0f} MiB; "
              f"compiled in {time.time() - t0:.1f} s; copy bandwidth {copy_gb_s:.0f} GB/s (read + write)", flush=True)
        for shape in SHAPES:
            r = bench_shape(cp, builds, *shape)
            results.append(r)
            v = r["variants"]
            print(f"{r['model']:7s} {r['role']:8s} " + "  ".join(
                f"{name} {x['us_per_launch']:7.2f} us {x['gb_s']:5.0f} GB/s e={x['rel_err_vs_reg']:.1e}"
                for name, x in v.items()), flush=True)
    # totals per step (GEMVs only)
    totals: dict = {}
    for r in results:
        for name, x in r["variants"].items():
            key = (r["model"], name)
            totals[key] = totals.get(key, 0.0) + x["us_per_launch"] * r["launches_per_step"] / 1e3
    models = sorted({r["model"] for r in results})
    names = list(VARIANTS)
    lines = ["", "GEMV ms per decode step (sum over the step's GEMV launches), and the same bytes at the copy "
             f"bandwidth ({copy_gb_s:.0f} GB/s)", f"{'model':8s} " + " ".join(f"{n:>9s}" for n in names) + "  at copy bw"]
    for m in models:
        floor = sum(r["bytes_per_launch"] * r["launches_per_step"] for r in results if r["model"] == m) / copy_gb_s / 1e6
        lines.append(f"{m:8s} " + " ".join(f"{totals[(m, n)]:9.3f}" for n in names) + f"  {floor:9.3f}")
    print("\n".join(lines), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"commit": os.environ.get("BENCH_COMMIT", "unknown"), "gpu": props["name"].decode(),
              "sm_count": ops.sm_count, "l2_bytes": props.get("l2CacheSize"), "copy_gb_s": copy_gb_s, "results": results,
              "totals_ms": {f"{m}/{n}": v for (m, n), v in totals.items()},
              "seconds": time.time() - t0}
    (out / f"gemv_bench-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
