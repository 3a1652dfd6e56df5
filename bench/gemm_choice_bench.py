"""Which product kernel per M: cuBLAS (cublasGemmEx's own pick), the best of cuBLASLt's candidates,
and the fused engine's one-row GEMV, on the 1B and 8B layer shapes at M = 1..256, each timed inside
a CUDA graph (so launch gaps count as in a decode turn, not Python's), beside the weight-read and
FLOP limits measured in the same run.

It also answers the question that kept the GEMV out of the batched path: does a row's product
come out bit-equal whatever M it is computed at? For each choice, row 0 of its product at M = m is
compared with the same row of cuBLAS's product at M = 64.

    python -m bench.gemm_choice_bench --out bench/results
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, commit, copy_bandwidth, gpu_name, graph_ms
from bench.engine_bench import matmul_rate

SHAPES = {  # name -> [(matrix, N, K)]
    "1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192),
           ("lm_head", 128256, 2048)],
    "8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
           ("lm_head", 128256, 4096)],
}
LAYERS = {"1b": 16, "8b": 32}


def best_lt(cp, lt, x, W, out, candidates: int):
    """(ms, index, algorithm) of the fastest of cuBLASLt's candidates for this product, or None."""
    m, k = x.shape
    best = None
    for j, algo in enumerate(lt.candidates(m, W.shape[0], k, "bfloat16", candidates)):
        try:
            t = graph_ms(cp, lambda a=algo: lt.linear(x, W, a, out))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be captured or run is skipped
            print(f"  lt candidate {j} failed: {exc}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, j, algo)
    return best


def measure_matrix(cp, kernels, rng, shape: str, matrix: str, n: int, k: int, ms_list: list[int], limits,
                   candidates: int) -> list[dict]:
    gemm, lt, gemv = kernels
    bandwidth, tflops = limits
    W = cp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype("bfloat16")
    x_all = cp.asarray(rng.standard_normal((max(ms_list), k), dtype=np.float32)).astype("bfloat16")
    reference = gemm.linear(cp.ascontiguousarray(x_all[:64]), W)[0].get()
    rows = []
    for m in ms_list:
        x = cp.ascontiguousarray(x_all[:m])
        out = cp.empty((m, n), dtype=W.dtype)
        limit_ms = max(W.nbytes / (bandwidth * 1e9), 2 * m * n * k / (tflops * 1e12)) * 1e3
        row = {"shape": shape, "matrix": matrix, "n": n, "k": k, "m": m, "limit_ms": limit_ms,
               "cublas_ms": graph_ms(cp, lambda: gemm.linear(x, W, out))}
        row["cublas_row0_equals_m64"] = bool(np.array_equal(gemm.linear(x, W)[0].get(), reference))
        best = best_lt(cp, lt, x, W, out, candidates)
        if best is not None:
            row["lt_best_ms"], row["lt_best_index"] = best[0], best[1]
            row["lt_row0_equals_cublas_m64"] = bool(np.array_equal(lt.linear(x, W, best[2])[0].get(), reference))
        if m == 1:
            row["gemv_ms"] = graph_ms(cp, lambda: gemv.gemv(W, x.reshape(-1), out.reshape(-1), "none", "store"))
            row["gemv_row0_equals_cublas_m64"] = bool(np.array_equal(out[0].get(), reference))
            row["gemv_differing_share"] = float(np.mean(out[0].get() != reference))
        rows.append(row)
        extra = "".join(f"  {key} {row[key]:.4f}" for key in ("lt_best_ms", "gemv_ms") if key in row)
        print(f"{shape} {matrix:>8} m={m:>3}  cublas {row['cublas_ms']:.4f} ms{extra}  limit {limit_ms:.4f}  "
              f"bit-equal cublas {row['cublas_row0_equals_m64']} lt {row.get('lt_row0_equals_cublas_m64')} "
              f"gemv {row.get('gemv_row0_equals_cublas_m64')}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--m", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    import cupy as cp

    from neuron.kernels.cublas_gemm import CublasGemm, CublasLtGemm
    from neuron.kernels import fused_gemv as kernels

    bandwidth = copy_bandwidth(cp)
    tflops = matmul_rate(cp)
    print(f"copy {bandwidth:,.0f} GB/s, fp16 matmul {tflops:,.0f} TFLOP/s", flush=True)
    gemm, lt = CublasGemm.for_current_device(), CublasLtGemm()
    gemv = kernels.CudaOps("bfloat16")
    ms_list = [int(m) for m in args.m.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes.split(","):
        for matrix, n, k in SHAPES[shape]:
            rows += measure_matrix(cp, (gemm, lt, gemv), rng, shape, matrix, n, k, ms_list, (bandwidth, tflops),
                                   args.candidates)
            cp.get_default_memory_pool().free_all_blocks()
    # per decode step: the layer products times the layers, plus the LM head
    summary = []
    for shape in args.shapes.split(","):
        for m in ms_list:
            sel = [r for r in rows if r["shape"] == shape and r["m"] == m]
            if not sel:
                continue
            def total(key, sel=sel, shape=shape):
                return sum(r.get(key, r["cublas_ms"]) * (1 if r["matrix"] == "lm_head" else LAYERS[shape]) for r in sel)
            best_of = sum(min(r["cublas_ms"], r.get("lt_best_ms", 1e9), r.get("gemv_ms", 1e9))
                          * (1 if r["matrix"] == "lm_head" else LAYERS[shape]) for r in sel)
            summary.append({"shape": shape, "m": m, "cublas_step_ms": total("cublas_ms"),
                            "lt_step_ms": total("lt_best_ms"), "best_step_ms": best_of,
                            "limit_step_ms": total("limit_ms")})
            s = summary[-1]
            print(f"{shape} m={m:>3} products per step: cublas {s['cublas_step_ms']:.3f} ms, lt best "
                  f"{s['lt_step_ms']:.3f}, best of all {s['best_step_ms']:.3f}, limit {s['limit_step_ms']:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gemm_choice_bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"commit": commit(), "gpu": gpu_name(), "copy_gb_s": bandwidth, "matmul_tflops": tflops,
                                "rows": rows, "per_step": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
