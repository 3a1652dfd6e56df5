"""Fused GPU kernels for the Llama-family forward pass, and their NumPy mirror.

Two implementations of one small set of operations:

- `CudaOps`: CuPy `RawModule` kernels (one module per dtype, plus one attention module per
  (dtype, group, head_dim) shape), and cuBLAS strided-batched GEMMs for prefill attention.
- `NumpyOps`: the same operations in NumPy, written to follow each kernel's arithmetic step by
  step (which values are rounded to the activation dtype and where, the split-K attention with its
  partial results and their combination). It runs the fused engine on the CPU in CI, and the GPU
  tests compare each CUDA kernel against it on random inputs.

Rounding follows the plain path in llama.py (the numerical reference): every value the plain path
holds in the activation dtype is rounded to it here too (`ft`), everything else is float32.

Activation/weight dtype T is bf16, fp16 or fp32; accumulation is always float32. The kernels read
the sequence position, KV slot and token from a small device array `meta` [pos, slot, token, 0], so
one captured CUDA graph serves every decode step.

Layouts (one sequence, T tokens, Hq query heads = Hkv kv heads x g, head_dim D):
  qkv      [T, (Hq + 2 Hkv) D]   output of the fused q/k/v projection
  q        [Hkv, T, g, D]        roped queries, grouped by kv head (for T=1 this is [Hq, D])
  k/v cache [slots, Hkv, max_ctx, D] per layer
  attn     [T, Hq D]             attention output, input of o_proj
"""
from __future__ import annotations

import re

import numpy as np

from common.dtypes import DTYPES
from common.dtypes import KERNEL_CODES as DT_CODES
from neuron.kernels.launch import launch, programmatic
from neuron.layers.ops import apply_rope

PRO = {"none": 0, "rms": 1, "silu": 2, "resid_rms": 3}
EPI = {"store": 0, "resid": 1, "logits": 2, "silu_pair": 3, "partial": 4, "rope": 5}
GEMV_THREADS = 256
GEMV_ROWS_PER_BLOCK = GEMV_THREADS // 32   # warps per block (each: one or two rows, or a gate/up pair)
GEMV_BLOCKS_PER_SM = 4                     # __launch_bounds__(256, 4) (3 for the norm prologues)
GEMV_SMEM_MAX = 227 * 1024                 # dynamic shared memory of one block, at most (sm_80, sm_90)
GEMVB_CONSUMERS = 16                       # bulk-copy GEMV (sm_90): consumer warps, plus one producer warp
GEMVB_ROW_MAX = 8192                       # "auto": the bulk GEMV for rows of at most this many bytes
GEMVB_PAIR_BELOW = 8192                    # bulk GEMV: rows of fewer bytes go two per unit
ATTN_SMEM_BUDGET = 40 * 1024              # static shared memory of the decode-attention kernel


def vec_elems(dtype_name: str) -> int:
    """Elements per 16-byte vector."""
    return 4 if dtype_name == "float32" else 8


def supports(config, layout, dtype_name: str) -> str | None:
    """None when the fused kernels handle this shard, else why not (the plain path then runs)."""
    v = vec_elems(dtype_name)
    d = config.head_dim
    hq, hkv = layout.local_heads, layout.local_kv_heads
    if dtype_name not in DT_CODES:
        return f"dtype {dtype_name}"
    for name, k in (("hidden_size", config.hidden_size), ("q width", hq * d),
                    ("intermediate width", len(layout.intermediate))):
        if k % v:
            return f"{name} {k} is not a multiple of {v}"
    if d % 2 or d % v:
        return f"head_dim {d} is not a multiple of {v}"
    if attn_threads(d) % 32:
        return f"head_dim {d} gives a thread count that is not a multiple of 32"
    if hq % hkv:
        return "query heads not a multiple of kv heads"
    if attn_chunk(dtype_name, hq // hkv, d) < 8:
        return f"head_dim {d} x group {hq // hkv} does not fit the attention kernel's shared memory"
    item = 4 if dtype_name == "float32" else 2
    for name, smem in (("hidden_size", CudaOps.gemv_smem("resid_rms", config.hidden_size, item, True)),
                       ("intermediate width", CudaOps.gemv_smem("none", len(layout.intermediate), item, False))):
        if smem > GEMV_SMEM_MAX:
            return f"{name}: the GEMV's staged input needs {smem} bytes of shared memory (at most {GEMV_SMEM_MAX})"
    return None


def gemv_kernel_names() -> list[str]:
    """The GEMV kernels the CUDA source instantiates (GEMV_INST / GEMVB_INST lines)."""
    return [f"{kind.lower()}_p{p}_e{e}_b{b}{'_r2' if r2 else ''}"
            for kind, r2, p, e, b in re.findall(r"\b(GEMVB?)_INST(2?)\((\d), (\d), (\d)\)", CUDA_KERNELS)]


def attn_threads(d: int) -> int:
    """Threads of the decode-attention block: D x JL, JL = max(1, 128 // D) key lanes."""
    return d * max(1, 128 // d) if d <= 128 else d


def attn_chunk(dtype_name: str, g: int, d: int) -> int:
    """Keys per split of the decode-attention kernel: K and V tiles, q, scores and the reduction
    scratch must fit ATTN_SMEM_BUDGET bytes of static shared memory."""
    item = 2 if dtype_name != "float32" else 4
    nt = attn_threads(d)
    fixed = g * d * 4 + nt * g * 4
    per_key = (2 * d + 16 // item) * item + g * 4   # the K row padded by 16 bytes
    c = (ATTN_SMEM_BUDGET - fixed) // per_key
    return int(min(64, c))


# --------------------------------------------------------------------------- CUDA source

CUDA_BASE = r"""
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#if DT == 0
typedef unsigned short T;
__device__ __forceinline__ float tf(T v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ T ft(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
}
#define VEC 8
#elif DT == 1
typedef unsigned short T;
__device__ __forceinline__ float tf(T v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T ft(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#define VEC 8
#else
typedef float T;
__device__ __forceinline__ float tf(T v) { return v; }
__device__ __forceinline__ T ft(float f) { return f; }
#define VEC 4
#endif

// A 16-byte vector <-> VEC floats.
__device__ __forceinline__ void unpack(const uint4& v, float* f) {
#if DT == 2
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
#else
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[2 * i] = tf((T)(w[i] & 0xffffu)); f[2 * i + 1] = tf((T)(w[i] >> 16)); }
#endif
}
__device__ __forceinline__ uint4 pack(const float* f) {
    uint4 v;
#if DT == 2
    v.x = __float_as_uint(f[0]); v.y = __float_as_uint(f[1]); v.z = __float_as_uint(f[2]); v.w = __float_as_uint(f[3]);
#else
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = ((unsigned int)ft(f[2 * i])) | (((unsigned int)ft(f[2 * i + 1])) << 16);
    v.x = w[0]; v.y = w[1]; v.z = w[2]; v.w = w[3];
#endif
    return v;
}
__device__ __forceinline__ float dot_acc(float acc, const uint4& a, const uint4& b) {
    float fa[VEC], fb[VEC];
    unpack(a, fa); unpack(b, fb);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc = fmaf(fa[i], fb[i], acc);
    return acc;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (MAX false) or maximum (MAX true) over the block (blockDim.x a multiple of 32); every thread
// gets the result.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    if (w == 0) {
        float r = lane < nw ? scratch[lane] : (MAX ? -INFINITY : 0.f);
        r = MAX ? warp_max(r) : warp_sum(r);
        if (lane == 0) scratch[0] = r;
    }
    __syncthreads();
    return scratch[0];
}
__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce<false>(v, scratch); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce<true>(v, scratch); }
__device__ __forceinline__ float silu_t(float g) { return tf(ft(g / (1.0f + expf(-g)))); }
// 16-byte global -> shared copies that run in the background (sm_80+): every copy of a tile is in
// flight at once instead of one load latency per loop iteration.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned int s = (unsigned int)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
// Programmatic dependent launch (kernels/launch.py): pdl_trigger lets the next kernel's blocks be
// scheduled while this one runs; pdl_wait waits until the kernel before this one has finished and
// its writes are visible. Below sm_90 they compile to nothing; launched the ordinary way they change
// nothing but still cost each block a little (+0.5 ms a turn over the 8B x 256 attention's ~22,000
// blocks), so kernels of many blocks run them only when launched programmatically.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
"""

CUDA_KERNELS = r"""
// ---------------------------------------------------------------- GEMV, T = 1
// out[N] = W[N, K] . prologue(x), one warp per unit, 16-byte loads, float32 accumulation. The
// prologue builds the input vector in shared memory: a copy (P 0), RMSNorm * weight (P 1), silu(gate)
// * up (P 2), or (P 3, "resid_rms") the residual add of a TP rank's summed float32 partial followed
// by RMSNorm: x = T(x + T(s) [+ bias, rounded]), as resid_add_f32 rounds; block 0 stores that new
// residual to xo (not xin: the other blocks are still reading it). The epilogue stores (E 0), adds
// into the residual (E 1), writes float32 logits (E 2), writes silu(gate) * up (E 3: W holds
// [gate; up], 2N rows, and the warp of output u computes rows u and N + u), or writes the raw
// float32 sum (E 4, "partial": a TP rank's share of a row-parallel product, summed over ranks in
// float32 and rounded once afterwards). R == 2: a warp computes two consecutive rows.
//
// Built so that small matrices (a TP rank's q/k/v and o, 25 and 17 MB on the 8B shape) and
// matrices of a few waves (gate/up, lm_head) run closer to the copy bandwidth:
// 1. Staged prologue: every input of the prologue (x; the norm weight; the float32 sum and its bias;
//    gate and up) is copied to shared memory with cp.async, all requests issued first, so the
//    prologue costs one round trip to L2. (The first version loaded them in dependent steps queued
//    behind the block's weight prefetch; requesting the weights of 2 first measured 0.8-2.5 us
//    slower per launch, bench/NOTES.md.)
// 2. The first unit's first batch of weights (BATCH vectors per lane and row) is requested into
//    registers before the prologue, so it is in flight while the prologue runs. With pdl (the
//    kernel launched programmatically, kernels/launch.py) it is requested first, while the kernel
//    before still runs, and the inputs are staged after pdl_wait.
// 3. Persistent warps: warp w of the grid (W warps) computes units w, w + W, w + 2W, ..., so the
//    host launches at most one wave and each block does its prologue once (lm_head: 15 waves of
//    blocks, each with its prologue, before).
// 4. Kernels with a norm prologue (P 1, 3) get 80 registers (__launch_bounds__(256, 3)): at 64 they
//    spilled a register of the batch requested in 2 and so waited for that load before starting
//    the prologue (ptxas: 16 bytes of spill stores; at 80 none, 68-72 registers used).
// Every lane sums its vectors i = lane + 32 j in ascending order (as every version since the first
// has, so their results are bit-identical: gemv_bench checks it). Shared memory (16-byte vectors, NV = K / VEC): xs [NV] the input
// vector; st [NV] the norm weight (P 1, 3) or up (P 2); P 3 also rss [NV * VEC / 4] (the float32
// sum) and, with rb, rbs [NV].
// The epilogue of one unit (lane 0): row is the unit's first row; acc (and acc2: the up row of a
// gate/up pair, or the row after) its float32 dot products.
template <int E, int B, int R>
__device__ __forceinline__ void gemv_epilogue(int row, float acc, float acc2, int N, const T* __restrict__ bias,
                                              T* __restrict__ out, float* __restrict__ outf) {
    if (E == 3) {
        T g = ft(acc), u = ft(acc2);
        if (B) {
            g = ft(tf(g) + tf(bias[row]));
            u = ft(tf(u) + tf(bias[N + row]));
        }
        out[row] = ft(silu_t(tf(g)) * tf(u));
        return;
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
        const int r = row + k;
        const float a = k == 0 ? acc : acc2;
        if (E == 2) {
            outf[r] = tf(ft(a));
        } else if (E == 4) {
            outf[r] = a;
        } else {
            T y = ft(a);
            if (B) y = ft(tf(y) + tf(bias[r]));
            if (E == 1) out[r] = ft(tf(out[r]) + tf(y));
            else out[r] = y;
        }
    }
}
// One unit of a warp: the dot product(s) of its row(s) with xs, then the epilogue. FIRST: the first
// batch is already in registers (pw, pw2).
template <int E, int B, int R, bool FIRST>
__device__ __forceinline__ void gemv_unit(int unit, const uint4* __restrict__ W4, const uint4* xs,
        const uint4 (&pw)[8 / R], const uint4 (&pw2)[R == 2 ? 8 / R : 1], int NV, int N, size_t rstride,
        int lane, const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ outf) {
    constexpr int BATCH = 8 / R;
    const int row = (E == 3 || R == 1) ? unit : unit * R;
    const uint4* wr = W4 + (size_t)row * NV;
    const uint4* wr2 = wr + rstride;
    float acc = 0.f, acc2 = 0.f;
    int i0 = lane;
    if (FIRST) {
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            if (lane + 32 * j < NV) {
                const uint4 xv4 = xs[lane + 32 * j];
                acc = dot_acc(acc, pw[j], xv4);
                if (R == 2) acc2 = dot_acc(acc2, pw2[j], xv4);
            }
        }
        i0 += 32 * BATCH;
    }
    // the rest in batches of BATCH vectors per lane, all of a batch's loads in flight at once (the
    // last batch predicated, not a serial tail)
    for (int i = i0; i < NV; i += 32 * BATCH) {
        uint4 w[BATCH], w2[R == 2 ? BATCH : 1];
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const bool ok = i + 32 * j < NV;
            w[j] = ok ? __ldg(wr + i + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
            if (R == 2) w2[j] = ok ? __ldg(wr2 + i + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            if (i + 32 * j < NV) {
                const uint4 xv4 = xs[i + 32 * j];
                acc = dot_acc(acc, w[j], xv4);
                if (R == 2) acc2 = dot_acc(acc2, w2[j], xv4);
            }
        }
    }
    acc = warp_sum(acc);
    if (R == 2) acc2 = warp_sum(acc2);
    if (lane == 0) gemv_epilogue<E, B, R>(row, acc, acc2, N, bias, out, outf);
}
// The staged prologue inputs in shared memory (see above).
struct GemvStage {
    uint4 *xs, *st, *rss, *rbs;
    __device__ GemvStage(unsigned char* smem, int NV) {
        xs = reinterpret_cast<uint4*>(smem);
        st = xs + NV;
        rss = st + NV;
        rbs = rss + (size_t)NV * (VEC / 4);
    }
};
// 1. the prologue's inputs -> shared memory, all in flight at once (cp.async; the caller waits)
template <int P>
__device__ __forceinline__ void gemv_stage(const GemvStage& s, int NV, const T* __restrict__ xin,
        const T* __restrict__ nw, const float* __restrict__ rs, const T* __restrict__ rb) {
    constexpr int QV = VEC / 4;                    // float4 per vector of the float32 sum
    const uint4* xv = reinterpret_cast<const uint4*>(xin);
    for (int i = threadIdx.x; i < NV; i += blockDim.x) {
        cp_async16(s.xs + i, xv + i);
        if (P == 1 || P == 3) cp_async16(s.st + i, reinterpret_cast<const uint4*>(nw) + i);
        if (P == 2) cp_async16(s.st + i, xv + NV + i);
        if (P == 3) {
            const uint4* sv = reinterpret_cast<const uint4*>(rs) + (size_t)i * QV;
#pragma unroll
            for (int q = 0; q < QV; ++q) cp_async16(s.rss + (size_t)i * QV + q, sv + q);
            if (rb != nullptr) cp_async16(s.rbs + i, reinterpret_cast<const uint4*>(rb) + i);
        }
    }
}
// 3. the prologue, on shared memory (a thread first reads back only what it staged itself); xs
// holds the input vector when it returns (after a __syncthreads).
template <int P>
__device__ __forceinline__ void gemv_prologue(const GemvStage& s, int NV, int K, float eps,
        const T* __restrict__ rb, T* __restrict__ xo, float* scratch) {
    constexpr int QV = VEC / 4;
    const int tid = threadIdx.x;
    if (P == 1 || P == 3) {
        float ss = 0.f;
        for (int i = tid; i < NV; i += blockDim.x) {
            float f[VEC];
            unpack(s.xs[i], f);
            if (P == 3) {
                const float* sf = reinterpret_cast<const float*>(s.rss + (size_t)i * QV);
                const T* bt = reinterpret_cast<const T*>(s.rbs + i);   // read only with rb
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    T y = ft(sf[e]);
                    if (rb != nullptr) y = ft(tf(y) + tf(bt[e]));
                    f[e] = tf(ft(f[e] + tf(y)));
                }
                const uint4 v = pack(f);
                if (blockIdx.x == 0) reinterpret_cast<uint4*>(xo)[i] = v;
                s.xs[i] = v;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss = fmaf(f[e], f[e], ss);
        }
        ss = block_sum(ss, scratch);
        const float denom = sqrtf(ss / (float)K + eps);
        for (int i = tid; i < NV; i += blockDim.x) {
            float f[VEC], g[VEC];
            unpack(s.xs[i], f);
            unpack(s.st[i], g);
#pragma unroll
            for (int e = 0; e < VEC; ++e) f[e] = g[e] * tf(ft(f[e] / denom));
            s.xs[i] = pack(f);
        }
    } else if (P == 2) {
        for (int i = tid; i < NV; i += blockDim.x) {
            float g[VEC], u[VEC];
            unpack(s.xs[i], g);
            unpack(s.st[i], u);
#pragma unroll
            for (int e = 0; e < VEC; ++e) g[e] = silu_t(g[e]) * u[e];
            s.xs[i] = pack(g);
        }
    }
    __syncthreads();
}
template <int P, int E, int B, int R>
__device__ __forceinline__ void gemv_impl(const T* __restrict__ W, const T* __restrict__ xin,
        const T* __restrict__ nw, const T* __restrict__ bias, T* __restrict__ out,
        float* __restrict__ outf, int N, int K, float eps,
        const float* __restrict__ rs, const T* __restrict__ rb, T* __restrict__ xo, int pdl) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __shared__ float scratch[32];
    constexpr int BATCH = 8 / R;                   // vectors per lane and row in flight at once
    const int NV = K / VEC;
    const GemvStage s(smem_raw, NV);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wpb = blockDim.x >> 5;
    const int nwarps = gridDim.x * wpb;
    const int units = (E == 3 || R == 1) ? N : N / R;
    const size_t rstride = (size_t)(E == 3 ? N : 1) * NV;   // second row of a unit: up, or the next row
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    int unit = blockIdx.x * wpb + warp;
    pdl_trigger();
    if (!pdl) gemv_stage<P>(s, NV, xin, nw, rs, rb);
    // 2. the first unit's first batch -> registers (weights: no wait for the kernel before)
    uint4 pw[BATCH], pw2[R == 2 ? BATCH : 1];
    {
        const bool has = unit < units;
        const uint4* wr = W4 + (size_t)(has ? ((E == 3 || R == 1) ? unit : unit * R) : 0) * NV;
        const uint4* wr2 = wr + rstride;
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
            const int i = lane + 32 * j;
            const bool ok = has && i < NV;
            pw[j] = ok ? __ldg(wr + i) : make_uint4(0u, 0u, 0u, 0u);
            if (R == 2) pw2[j] = ok ? __ldg(wr2 + i) : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    if (pdl) {   // launched programmatically: the input vector is the running kernel's output
        pdl_wait();
        gemv_stage<P>(s, NV, xin, nw, rs, rb);
    }
    cp_async_wait_all();
    gemv_prologue<P>(s, NV, K, eps, rb, xo, scratch);
    // 4. this warp's units: the first one with the batch requested before the prologue
    if (unit < units) {
        gemv_unit<E, B, R, true>(unit, W4, s.xs, pw, pw2, NV, N, rstride, lane, bias, out, outf);
        unit += nwarps;
    }
    for (; unit < units; unit += nwarps)
        gemv_unit<E, B, R, false>(unit, W4, s.xs, pw, pw2, NV, N, rstride, lane, bias, out, outf);
}

// ---------------------------------------------------------------- GEMV, T = 1, bulk-copied weights (sm_90)
// The same function as gemv_* (same prologue, epilogues and per-lane summation order: bit-identical
// results), with the weights brought into shared memory by the copy engine (cp.async.bulk, TMA)
// instead of by loads into registers. The register kernel can have at most ~96 KiB of weights in
// flight per SM, and its second batch waits for the prologue; a TP rank's q/k/v is 190 KiB per SM, so
// each launch paid two DRAM round trips plus the prologue with the HBM partly idle.
// Here one block per SM owns a contiguous range of units (R rows: one, two where a row is under 8 KiB,
// or a gate/up pair) and a ring of S one-unit slots. A producer warp (the last) requests the first S
// units at the kernel's first instruction, before the prologue, and refills a slot when the consumer
// warp that read it releases it. mbarriers: full[s] completes when the slot's bytes have landed,
// empty[s] when its consumer is done with it. Consumer warp c (of nc <= GEMVB_CONSUMERS) computes the
// block's units c, c + nc, ... When the ring wraps, nc divides S, so slot s is only ever read by warp
// s mod nc, which waits for its phases in order: a parity wait cannot tell phase r from r + 2, and a
// second reader running ahead would take the previous round's completion for its own. Dynamic shared
// memory: the staged prologue inputs (as gemv_*), full[S] and empty[S] at bar_off, the slots at
// slot_off. (Rows cut into column chunks, one slot each, to refill the ring sooner on down: measured
// slower, bench/NOTES.md.)
#ifndef GEMVB_CONSUMERS
#define GEMVB_CONSUMERS 8
#endif
#define GEMVB_THREADS (32 * (GEMVB_CONSUMERS + 1))
// E 5 ("rope", one token): the q/k/v product with the rotary embedding and the paged KV write of
// rope_write_kv_vec (kernels/layer_ops.cu) in its epilogue, same roundings: each q or k rotation
// pair (j, j + d/2 of a head) is one unit of two rows, the v rows go two by two. q -> q[hq, d];
// k, v -> slot slots[0] of k, v [slots, hkv, d], at position positions[0] of the cos/sin tables.
struct RopeArgs {
    const int* positions;
    const float* cos;
    const float* sin;
    const long long* slots;
    T* q;
    T* k;
    T* v;
    int hq, hkv, d;
};
__device__ __forceinline__ void rope_rows(int u, const RopeArgs& ra, int& a, int& b) {
    const int half = ra.d / 2, pairs = (ra.hq + ra.hkv) * half;
    if (u < pairs) {
        const int head = u / half;
        a = head * ra.d + (u - head * half);
        b = a + half;
    } else {
        a = (ra.hq + ra.hkv) * ra.d + 2 * (u - pairs);
        b = a + 1;
    }
}
template <int B>
__device__ __forceinline__ void rope_epilogue(int u, float acc, float acc2, const T* __restrict__ bias,
                                              const RopeArgs& ra) {
    int a, b;
    rope_rows(u, ra, a, b);
    T ya = ft(acc), yb = ft(acc2);
    if (B) {
        ya = ft(tf(ya) + tf(bias[a]));
        yb = ft(tf(yb) + tf(bias[b]));
    }
    const long long slot = ra.slots[0];
    const int half = ra.d / 2, pairs = (ra.hq + ra.hkv) * half;
    if (u >= pairs) {
        T* v = ra.v + slot * ra.hkv * ra.d + (a - (ra.hq + ra.hkv) * ra.d);
        v[0] = ya;
        v[1] = yb;
        return;
    }
    const int head = u / half, j = u - head * half;
    const float* c = ra.cos + (long long)ra.positions[0] * ra.d;
    const float* sn = ra.sin + (long long)ra.positions[0] * ra.d;
    const float x = tf(ya), y = tf(yb);
    const float lo = __fadd_rn(__fmul_rn(x, c[j]), __fmul_rn(-y, sn[j]));
    const float hi = __fadd_rn(__fmul_rn(y, c[j + half]), __fmul_rn(x, sn[j + half]));
    T* dst = head < ra.hq ? ra.q + head * ra.d : ra.k + (slot * ra.hkv + (head - ra.hq)) * ra.d;
    dst[j] = ft(lo);
    dst[j + half] = ft(hi);
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_u32(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
}
// bytes (a multiple of 16) global -> shared by the copy engine; completes on bar's transaction count
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(bar)) : "memory");
}
// unit k of the block -> slot s: rows R (u0 + k) ... + R - 1, or with E 3 gate row u0 + k and its
// up row N + u0 + k, or with E 5 the two rows rope_rows names
template <int E, int R>
__device__ __forceinline__ void gemvb_request(int k, int s, int u0, int N, int NV, const uint4* W4, uint4* slots,
                                              unsigned long long* full, const RopeArgs& ra) {
    const unsigned row_bytes = (unsigned)NV * 16u;
    uint4* dst = slots + (size_t)s * R * NV;
    mbar_expect_tx(full + s, R * row_bytes);
    if (E == 3) {
        bulk_copy(dst, W4 + (size_t)(u0 + k) * NV, row_bytes, full + s);
        bulk_copy(dst + NV, W4 + (size_t)(N + u0 + k) * NV, row_bytes, full + s);
    } else if (E == 5) {
        int a, b;
        rope_rows(u0 + k, ra, a, b);
        bulk_copy(dst, W4 + (size_t)a * NV, row_bytes, full + s);
        bulk_copy(dst + NV, W4 + (size_t)b * NV, row_bytes, full + s);
    } else {
        bulk_copy(dst, W4 + (size_t)(u0 + k) * R * NV, R * row_bytes, full + s);
    }
}
#endif
template <int P, int E, int B, int R>
__device__ __forceinline__ void gemvb_impl(const T* __restrict__ W, const T* __restrict__ xin,
        const T* __restrict__ nw, const T* __restrict__ bias, T* __restrict__ out,
        float* __restrict__ outf, int N, int K, float eps,
        const float* __restrict__ rs, const T* __restrict__ rb, T* __restrict__ xo,
        int upb, int S, int nc, int bar_off, int slot_off, const RopeArgs ra = RopeArgs()) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char smem_raw[];
    __shared__ float scratch[32];
    const int NV = K / VEC;                        // R: rows per unit
    const int units = E == 3 ? N : N / R;
    const GemvStage s(smem_raw, NV);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem_raw + bar_off);
    unsigned long long* empty = full + S;
    uint4* slots = reinterpret_cast<uint4*>(smem_raw + slot_off);
    const uint4* W4 = reinterpret_cast<const uint4*>(W);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int u0 = blockIdx.x * upb, nu = min(upb, units - u0);   // this block's units
    pdl_trigger();
    if (tid == 0) {
        for (int i = 0; i < S; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, 1);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const bool producer = warp == GEMVB_CONSUMERS;
    if (producer && lane == 0)
        for (int k = 0; k < min(S, nu); ++k) gemvb_request<E, R>(k, k, u0, N, NV, W4, slots, full, ra);
    pdl_wait();   // the input vector is the kernel before's output (one block an SM: the cost is small)
    gemv_stage<P>(s, NV, xin, nw, rs, rb);
    cp_async_wait_all();
    gemv_prologue<P>(s, NV, K, eps, rb, xo, scratch);
    if (producer) {
        unsigned phase = 0;                        // of empty[sl]: the previous round's release
        for (int k = S, sl = 0; lane == 0 && k < nu; ++k) {
            mbar_wait(empty + sl, phase);
            gemvb_request<E, R>(k, sl, u0, N, NV, W4, slots, full, ra);
            if (++sl == S) {
                sl = 0;
                phase ^= 1u;
            }
        }
        return;
    }
    if (warp >= nc) return;
    unsigned phase = 0;                            // of full[sl]: unit k's round of its slot
    for (int k = warp, sl = warp; k < nu; k += nc, sl += nc) {
        if (sl >= S) {                             // nc <= S when the ring wraps
            sl -= S;
            phase ^= 1u;
        }
        mbar_wait(full + sl, phase);
        const uint4* w = slots + (size_t)sl * R * NV;
        float acc = 0.f, acc2 = 0.f;
#pragma unroll 4
        for (int i = lane; i < NV; i += 32) {
            const uint4 xv4 = s.xs[i];
            acc = dot_acc(acc, w[i], xv4);
            if (R == 2) acc2 = dot_acc(acc2, w[NV + i], xv4);
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + sl);
        acc = warp_sum(acc);
        if (R == 2) acc2 = warp_sum(acc2);
        if (lane == 0) {
            if (E == 5) rope_epilogue<B>(u0 + k, acc, acc2, bias, ra);
            else gemv_epilogue<E, B, R>(E == 3 ? u0 + k : (u0 + k) * R, acc, acc2, N, bias, out, outf);
        }
    }
#else
    __trap();   // the host launches gemvb_* only on sm_90 and later
#endif
}
#ifndef GEMV_NORM_MIN_BLOCKS
#define GEMV_NORM_MIN_BLOCKS 3
#endif
#define GEMV_MIN_BLOCKS(P) ((P) == 1 || (P) == 3 ? GEMV_NORM_MIN_BLOCKS : 4)
#define GEMV_ARGS const T* __restrict__ W, const T* __restrict__ xin, const T* __restrict__ nw, \
    const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ outf, int N, int K, float eps, \
    const float* __restrict__ rs, const T* __restrict__ rb, T* __restrict__ xo
#define GEMV_PASS W, xin, nw, bias, out, outf, N, K, eps, rs, rb, xo
#define GEMV_INST(P, E, B) extern "C" __global__ void __launch_bounds__(256, GEMV_MIN_BLOCKS(P)) \
    gemv_p##P##_e##E##_b##B(GEMV_ARGS, int pdl) { gemv_impl<P, E, B, E == 3 ? 2 : 1>(GEMV_PASS, pdl); }
#define GEMV_INST2(P, E, B) extern "C" __global__ void __launch_bounds__(256, GEMV_MIN_BLOCKS(P)) \
    gemv_p##P##_e##E##_b##B##_r2(GEMV_ARGS, int pdl) { gemv_impl<P, E, B, 2>(GEMV_PASS, pdl); }
GEMV_INST(0, 0, 0) GEMV_INST(0, 0, 1) GEMV_INST(0, 1, 0) GEMV_INST(0, 1, 1) GEMV_INST(0, 2, 0)
GEMV_INST(1, 0, 0) GEMV_INST(1, 0, 1) GEMV_INST(1, 1, 0) GEMV_INST(1, 1, 1) GEMV_INST(1, 2, 0)
GEMV_INST(2, 0, 0) GEMV_INST(2, 0, 1) GEMV_INST(2, 1, 0) GEMV_INST(2, 1, 1) GEMV_INST(2, 2, 0)
GEMV_INST(0, 3, 0) GEMV_INST(0, 3, 1) GEMV_INST(1, 3, 0) GEMV_INST(1, 3, 1)
GEMV_INST(0, 4, 0) GEMV_INST2(0, 4, 0)
GEMV_INST(3, 0, 0) GEMV_INST(3, 0, 1) GEMV_INST(3, 2, 0) GEMV_INST(3, 3, 0) GEMV_INST(3, 3, 1)
GEMV_INST2(3, 0, 0) GEMV_INST2(3, 0, 1) GEMV_INST2(3, 2, 0)
GEMV_INST2(0, 0, 0) GEMV_INST2(0, 0, 1) GEMV_INST2(0, 1, 0) GEMV_INST2(0, 1, 1) GEMV_INST2(0, 2, 0)
GEMV_INST2(1, 0, 0) GEMV_INST2(1, 0, 1) GEMV_INST2(1, 1, 0) GEMV_INST2(1, 1, 1) GEMV_INST2(1, 2, 0)
#define GEMVB_ARGS GEMV_ARGS, int upb, int S, int nc, int bar_off, int slot_off
#define GEMVB_PASS GEMV_PASS, upb, S, nc, bar_off, slot_off
#define GEMVB_INST(P, E, B) extern "C" __global__ void __launch_bounds__(GEMVB_THREADS, 1) \
    gemvb_p##P##_e##E##_b##B(GEMVB_ARGS) { gemvb_impl<P, E, B, E == 3 ? 2 : 1>(GEMVB_PASS); }
#define GEMVB_INST2(P, E, B) extern "C" __global__ void __launch_bounds__(GEMVB_THREADS, 1) \
    gemvb_p##P##_e##E##_b##B##_r2(GEMVB_ARGS) { gemvb_impl<P, E, B, 2>(GEMVB_PASS); }
GEMVB_INST(0, 0, 0) GEMVB_INST(0, 0, 1) GEMVB_INST(0, 1, 0) GEMVB_INST(0, 1, 1) GEMVB_INST(0, 2, 0)
GEMVB_INST(1, 0, 0) GEMVB_INST(1, 0, 1) GEMVB_INST(1, 1, 0) GEMVB_INST(1, 1, 1) GEMVB_INST(1, 2, 0)
GEMVB_INST(2, 0, 0) GEMVB_INST(2, 0, 1) GEMVB_INST(2, 1, 0) GEMVB_INST(2, 1, 1) GEMVB_INST(2, 2, 0)
GEMVB_INST(0, 3, 0) GEMVB_INST(0, 3, 1) GEMVB_INST(1, 3, 0) GEMVB_INST(1, 3, 1) GEMVB_INST(0, 4, 0)
GEMVB_INST(3, 0, 0) GEMVB_INST(3, 0, 1) GEMVB_INST(3, 2, 0) GEMVB_INST(3, 3, 0) GEMVB_INST(3, 3, 1)
GEMVB_INST2(0, 0, 0) GEMVB_INST2(0, 0, 1) GEMVB_INST2(0, 1, 0) GEMVB_INST2(0, 1, 1) GEMVB_INST2(0, 2, 0)
GEMVB_INST2(1, 0, 0) GEMVB_INST2(1, 0, 1) GEMVB_INST2(1, 1, 0) GEMVB_INST2(1, 1, 1) GEMVB_INST2(1, 2, 0)
GEMVB_INST2(0, 4, 0) GEMVB_INST2(3, 0, 0) GEMVB_INST2(3, 0, 1) GEMVB_INST2(3, 2, 0)
#define GEMVB_ROPE_INST(P, B) extern "C" __global__ void __launch_bounds__(GEMVB_THREADS, 1) \
    gemvb_p##P##_e5_b##B(GEMVB_ARGS, const int* positions, const float* cos_table, const float* sin_table, \
                         const long long* slots, T* q, T* k_cache, T* v_cache, int hq, int hkv, int d) { \
        gemvb_impl<P, 5, B, 2>(GEMVB_PASS, RopeArgs{positions, cos_table, sin_table, slots, q, k_cache, v_cache, \
                                                    hq, hkv, d}); }
GEMVB_ROPE_INST(1, 0) GEMVB_ROPE_INST(1, 1)

// ---------------------------------------------------------------- embedding row (decode)
// The token is meta[2], or, when meta[2] < 0 (a chained step), the last token picked for this
// slot on the device: tokens[meta[1]].
extern "C" __global__ void embed_row(const T* __restrict__ table, const int* __restrict__ meta,
                                     const int* __restrict__ tokens, T* __restrict__ x, int H) {
    const size_t tok = (size_t)(meta[2] >= 0 ? meta[2] : tokens[meta[1]]);
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < H; k += gridDim.x * blockDim.x)
        x[k] = table[tok * H + k];
}

// ---------------------------------------------------------------- q/k/v post-processing
// grid (Tn, Hq + Hkv), block D/2 threads: bias, q/k RMSNorm, rotary embedding; q -> [Hkv, Tn, g, D],
// k and v -> the cache at positions meta[0] + t of slot meta[1].
extern "C" __global__ void qkv_post(const T* __restrict__ qkv, const T* __restrict__ bias,
        const T* __restrict__ qn, const T* __restrict__ kn, const float* __restrict__ cos_t,
        const float* __restrict__ sin_t, T* __restrict__ qout, T* __restrict__ kc, T* __restrict__ vc,
        const int* __restrict__ meta, int Tn, int Hq, int Hkv, int D, int maxc, float eps,
        int has_bias, int has_qkn) {
    __shared__ float ss;
    const int t = blockIdx.x, hd = blockIdx.y, i = threadIdx.x, half = D >> 1;
    const int pos = meta[0] + t, slot = meta[1];
    const T* row = qkv + (size_t)t * (Hq + 2 * Hkv) * D;
    const int col = hd * D;
    float a = tf(row[col + i]), b = tf(row[col + i + half]);
    if (has_bias) {
        a = tf(ft(a + tf(bias[col + i])));
        b = tf(ft(b + tf(bias[col + i + half])));
    }
    if (has_qkn) {
        const T* w = hd < Hq ? qn : kn;
        if (i == 0) ss = 0.f;
        __syncthreads();
        atomicAdd(&ss, a * a + b * b);
        __syncthreads();
        const float denom = sqrtf(ss / (float)D + eps);
        a = tf(ft(tf(w[i]) * tf(ft(a / denom))));
        b = tf(ft(tf(w[i + half]) * tf(ft(b / denom))));
    }
    const float* cr = cos_t + (size_t)pos * D;
    const float* sr = sin_t + (size_t)pos * D;
    const T o1 = ft(a * cr[i] - b * sr[i]);
    const T o2 = ft(b * cr[i + half] + a * sr[i + half]);
    if (hd < Hq) {
        const int g = Hq / Hkv, kvh = hd / g, gi = hd % g;
        T* dst = qout + (((size_t)kvh * Tn + t) * g + gi) * D;
        dst[i] = o1;
        dst[i + half] = o2;
    } else {
        const int kh = hd - Hq;
        const size_t off = (((size_t)slot * Hkv + kh) * maxc + pos) * D;
        kc[off + i] = o1;
        kc[off + i + half] = o2;
        const int vcol = (Hq + Hkv) * D + kh * D;
        float v1 = tf(row[vcol + i]), v2 = tf(row[vcol + i + half]);
        if (has_bias) {
            v1 = tf(ft(v1 + tf(bias[vcol + i])));
            v2 = tf(ft(v2 + tf(bias[vcol + i + half])));
        }
        vc[off + i] = ft(v1);
        vc[off + i + half] = ft(v2);
    }
}

// ---------------------------------------------------------------- attention helpers (prefill)
// Causal (and sliding-window) softmax over rows of S [Hkv, M, Lc] in place; row r of head h is the
// query at position meta[0] + t0 + r / g. grid (M, Hkv), block 256.
extern "C" __global__ void softmax_rows(T* __restrict__ S, const int* __restrict__ meta, int M, int Lc,
                                        int g, int t0, int window, float scale) {
    __shared__ float scratch[32];
    T* s = S + ((size_t)blockIdx.y * M + blockIdx.x) * Lc;
    const int qpos = meta[0] + t0 + blockIdx.x / g;
    const int klo = window > 0 ? max(0, qpos - window + 1) : 0;
    const int khi = min(qpos, Lc - 1);
    float m = -INFINITY;
    for (int k = klo + threadIdx.x; k <= khi; k += blockDim.x) m = fmaxf(m, tf(s[k]) * scale);
    m = block_max(m, scratch);
    float l = 0.f;
    for (int k = klo + threadIdx.x; k <= khi; k += blockDim.x) l += expf(tf(s[k]) * scale - m);
    l = block_sum(l, scratch);
    for (int k = threadIdx.x; k < Lc; k += blockDim.x) {
        const float p = (k >= klo && k <= khi) ? expf(tf(s[k]) * scale - m) / l : 0.f;
        s[k] = ft(p);
    }
}

// x[r] (+)= delta[r] (rounded to T), h[r] = RMSNorm(x[r]) * w.  grid rows, block 256.
extern "C" __global__ void add_rmsnorm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                       T* __restrict__ h, int H, float eps, int has_delta) {
    __shared__ float scratch[32];
    T* xr = x + (size_t)blockIdx.x * H;
    const T* dr = delta + (size_t)blockIdx.x * H;
    T* hr = h + (size_t)blockIdx.x * H;
    float ss = 0.f;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        float v = tf(xr[k]);
        if (has_delta) {
            const T nv = ft(v + tf(dr[k]));
            xr[k] = nv;
            v = tf(nv);
        }
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss, scratch);
    const float denom = sqrtf(ss / (float)H + eps);
    for (int k = threadIdx.x; k < H; k += blockDim.x) hr[k] = ft(tf(w[k]) * tf(ft(tf(xr[k]) / denom)));
}

// Tensor parallelism: x[r] (+)= s[r] (+ bias[r]) where s is the float32 sum over ranks of the
// row-parallel partials (rows x H). Rounded exactly as the single-rank residual epilogue rounds
// its float32 dot product: y = T(s) (+ bias, rounded), x = T(x + y). With h != 0 the row's RMSNorm
// follows, as in add_rmsnorm: h[r] = RMSNorm(x[r]) * w. grid rows, block 256.
extern "C" __global__ void resid_add_f32(T* __restrict__ x, const float* __restrict__ s, const T* __restrict__ bias,
                                         const T* __restrict__ w, T* __restrict__ h, int H, float eps, int has_bias) {
    __shared__ float scratch[32];
    T* xr = x + (size_t)blockIdx.x * H;
    const float* sr = s + (size_t)blockIdx.x * H;
    float ss = 0.f;
    for (int k = threadIdx.x; k < H; k += blockDim.x) {
        T y = ft(sr[k]);
        if (has_bias) y = ft(tf(y) + tf(bias[k]));
        const T nv = ft(tf(xr[k]) + tf(y));
        xr[k] = nv;
        const float v = tf(nv);
        ss = fmaf(v, v, ss);
    }
    if (h == nullptr) return;
    ss = block_sum(ss, scratch);
    const float denom = sqrtf(ss / (float)H + eps);
    T* hr = h + (size_t)blockIdx.x * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) hr[k] = ft(tf(w[k]) * tf(ft(tf(xr[k]) / denom)));
}

// out[t, k] = silu(gu[t, k]) * gu[t, I + k], rounded as the plain path rounds.
extern "C" __global__ void silu_mul(const T* __restrict__ gu, T* __restrict__ out, int Tn, int I) {
    const size_t n = (size_t)Tn * I;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t t = idx / I, k = idx % I;
        out[idx] = ft(silu_t(tf(gu[t * 2 * I + k])) * tf(gu[t * 2 * I + I + k]));
    }
}

// out[meta ? meta[1] : 0] = the first index of the largest logit. One block of 1024 threads.
extern "C" __global__ void argmax_f32(const float* __restrict__ x, int n, int* __restrict__ out,
                                      const int* __restrict__ meta) {
    __shared__ float sv[32];
    __shared__ int si[32];
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const float v = x[k];
        if (v > best) { best = v; bi = k; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) { sv[w] = best; si[w] = bi; }
    __syncthreads();
    if (w == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -INFINITY;
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) out[meta ? meta[1] : 0] = bi == 0x7fffffff ? 0 : bi;
    }
}
"""

# Decode attention (one query token), split over the keys: grid (NS, Hkv), NT threads. Each block
# copies its chunk of C keys and values into shared memory (cp.async, all in flight at once),
# scores the g query heads of its kv head (one thread per key), and writes the partial softmax
# state (max, sum, sum of p * v) of its chunk; attn_combine merges the chunks of each head.
CUDA_ATTN = r"""
// compile-time: ATT_G (query heads per kv head), ATT_D (head_dim), ATT_C (keys per split), ATT_NT (threads),
// ATT_JL (key lanes)
#define G ATT_G
#define D ATT_D
#define C ATT_C
#define NT ATT_NT
#define JL ATT_JL
// q.k takes one thread per key, reading the key row from shared memory in 16-byte pieces (rows
// padded by 16 bytes, so the reads of a quarter warp hit distinct banks); no warp shuffles. (A
// first version used a warp per key with shuffle reductions: 13.2 us per layer at context 300 on
// the 8B shape, against 6.0 us for this one.)
#define KP (D + 8)
extern "C" __global__ void __launch_bounds__(NT) attn_split(const T* __restrict__ q, const T* __restrict__ kc,
        const T* __restrict__ vc, const int* __restrict__ meta, float* __restrict__ po, float* __restrict__ pm,
        float* __restrict__ pl, int Hkv, int maxc, int window, float scale) {
    __shared__ __align__(16) T Ks[C * KP];
    __shared__ __align__(16) T Vs[C * D];
    __shared__ float qs[G * D];
    __shared__ float ps[G * C];
    __shared__ float red[NT * G];
    const int s = blockIdx.x, h = blockIdx.y, NS = gridDim.x, tid = threadIdx.x;
    const int pos = meta[0], slot = meta[1];
    const int first = window > 0 ? max(0, pos - window + 1) : 0;
    const int lo = max(s * C, first);
    const int hi = min(s * C + C, pos + 1);
    const bool whole = lo == first && hi == pos + 1;
    if (lo >= hi) {
        for (int g = tid; g < G; g += NT) { pm[(h * G + g) * NS + s] = -INFINITY; pl[(h * G + g) * NS + s] = 0.f; }
        return;
    }
    const int n = hi - lo;
    const size_t base = (((size_t)slot * Hkv + h) * maxc + lo) * D;
    const uint4* ksrc = reinterpret_cast<const uint4*>(kc + base);
    const uint4* vsrc = reinterpret_cast<const uint4*>(vc + base);
    uint4* kdst = reinterpret_cast<uint4*>(Ks);
    uint4* vdst = reinterpret_cast<uint4*>(Vs);
    constexpr int RV = D / VEC, RVP = KP / VEC;   // 16-byte vectors per key row, unpadded / padded
    const int nvec = n * RV;
    for (int i = tid; i < nvec; i += NT) {
        const int j = i / RV, v = i - j * RV;
        cp_async16(kdst + j * RVP + v, ksrc + i);
        cp_async16(vdst + i, vsrc + i);
    }
    for (int i = tid; i < G * D; i += NT) qs[i] = tf(q[(size_t)h * G * D + i]);
    cp_async_wait_all();
    __syncthreads();
    for (int j = tid; j < n; j += NT) {
        float acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = 0.f;
#pragma unroll 4
        for (int v = 0; v < RV; ++v) {
            float kf[VEC];
            unpack(kdst[j * RVP + v], kf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
#pragma unroll
                for (int g = 0; g < G; ++g) acc[g] = fmaf(qs[g * D + v * VEC + e], kf[e], acc[g]);
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) ps[g * C + j] = tf(ft(acc[g])) * scale;
    }
    __syncthreads();
    const int lane = tid & 31, warp = tid >> 5, NW = NT / 32;
    for (int g = warp; g < G; g += NW) {
        float m = -INFINITY;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, ps[g * C + j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float p = expf(ps[g * C + j] - m);
            ps[g * C + j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (whole) {
            for (int j = lane; j < n; j += 32) ps[g * C + j] = tf(ft(ps[g * C + j] / l));
        }
        if (lane == 0) { pm[(h * G + g) * NS + s] = m; pl[(h * G + g) * NS + s] = whole ? 1.f : l; }
    }
    __syncthreads();
    const int e = tid % D, jl = tid / D;
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.f;
    if (jl < JL) {
        for (int j = jl; j < n; j += JL) {
            const float v = tf(Vs[j * D + e]);
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g] = fmaf(ps[g * C + j], v, acc[g]);
        }
    }
    if (JL == 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) po[((size_t)(h * G + g) * NS + s) * D + e] = acc[g];
    } else {
        if (jl < JL) {
#pragma unroll
            for (int g = 0; g < G; ++g) red[(jl * G + g) * D + e] = acc[g];
        }
        __syncthreads();
        if (jl == 0) {
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float r = 0.f;
                for (int l2 = 0; l2 < JL; ++l2) r += red[(l2 * G + g) * D + e];
                po[((size_t)(h * G + g) * NS + s) * D + e] = r;
            }
        }
    }
}

// grid Hq, block NT, dynamic shared memory NS floats: out[j, :] = sum_s w_s acc_s / sum_s w_s l_s,
// w_s = exp(m_s - M) over the non-empty splits (l_s > 0). Only splits that can hold keys for this
// position are read; the per-split weights are computed once, in parallel, into shared memory.
extern "C" __global__ void __launch_bounds__(NT) attn_combine(const float* __restrict__ po,
        const float* __restrict__ pm, const float* __restrict__ pl, T* __restrict__ out,
        const int* __restrict__ meta, int NS) {
    extern __shared__ float wts[];
    __shared__ float scratch[32];
    const int j = blockIdx.x, tid = threadIdx.x;
    const int active = min(NS, meta[0] / C + 1);
    float M = -INFINITY;
    for (int s = tid; s < active; s += NT) if (pl[j * NS + s] > 0.f) M = fmaxf(M, pm[j * NS + s]);
    M = block_max(M, scratch);
    float den = 0.f;
    for (int s = tid; s < active; s += NT) {
        const float l = pl[j * NS + s];
        const float w = l > 0.f ? expf(pm[j * NS + s] - M) : 0.f;
        wts[s] = w;
        den = fmaf(w, l, den);
    }
    den = block_sum(den, scratch);   // its barriers also publish wts
    if (tid < D) {
        const float* src = po + (size_t)j * NS * D + tid;
        float num = 0.f;
#pragma unroll 4
        for (int s = 0; s < active; ++s) {
            const float w = wts[s];
            const float v = src[(size_t)s * D];
            num += w > 0.f ? w * v : 0.f;
        }
        out[(size_t)j * D + tid] = ft(num / den);
    }
}
"""


# --------------------------------------------------------------------------- CUDA ops

class CudaOps:
    """Launches the kernels above on CuPy arrays (all on the current device and stream)."""

    def __init__(self, dtype_name: str, norm_min_blocks: int = 3, bulk: str = "auto",
                 bulk_consumers: int = GEMVB_CONSUMERS, bulk_pair_below: int = GEMVB_PAIR_BELOW,
                 rope_epilogue: bool = True):
        """rope_epilogue: whether can_rope offers the "rope" epilogue (one token's q/k/v GEMV with
        the rotary and the KV write; tests/gpu/test_gpu_layer_ops.py holds it to the product
        followed by rope_write_kv, bit for bit).
        norm_min_blocks: the register GEMVs with a norm prologue are built for this many blocks per
        SM (3: 80 registers, no spill; 4: 64 registers, which spills). bulk: which decode GEMVs stream
        their weights into shared memory with bulk copies (gemvb_*, sm_90 and later) with
        bulk_consumers warps computing per block: "auto" those with rows of at most GEMVB_ROW_MAX
        bytes (measured faster there; slower on the longer rows of down, bench/NOTES.md),
        "always" every one whose slots fit, "never" none. Rows of fewer than bulk_pair_below bytes
        are computed two per warp."""
        import cupy
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        self.cp, self.cublas, self.runtime = cupy, cublas, runtime
        self.dtype_name = dtype_name
        self.dt = DT_CODES[dtype_name]
        self.vec = vec_elems(dtype_name)
        self.options = ("--std=c++17", f"-DDT={self.dt}", f"-DGEMV_NORM_MIN_BLOCKS={norm_min_blocks}",
                        f"-DGEMVB_CONSUMERS={bulk_consumers}")
        self.bulk_consumers = bulk_consumers
        self.rope_epilogue = rope_epilogue
        self.bulk_pair_below = bulk_pair_below
        self.bulk_threads = 32 * (bulk_consumers + 1)
        self.module = cupy.RawModule(code=CUDA_BASE + CUDA_KERNELS, options=self.options)
        self._fn: dict = {}
        self._attn: dict = {}
        self._attn_modules: dict = {}
        self._smem_set: dict = {}
        self.cuda_dtype = {0: runtime.CUDA_R_16BF, 1: runtime.CUDA_R_16F, 2: runtime.CUDA_R_32F}[self.dt]
        props = runtime.getDeviceProperties(runtime.getDevice())
        self.sm_count = props["multiProcessorCount"]
        if bulk not in ("auto", "always", "never"):
            raise ValueError(f"bulk: auto, always or never, not {bulk!r}")
        if bulk == "always" and props["major"] < 9:
            raise ValueError("bulk-copy GEMVs need sm_90 or later")
        self.bulk = "never" if props["major"] < 9 else bulk
        self.smem_optin = int(props.get("sharedMemPerBlockOptin", GEMV_SMEM_MAX))
        self._occupancy: dict = {}
        self._plans: dict = {}
        self._one = np.array(1.0, dtype=np.float32)
        self._zero = np.array(0.0, dtype=np.float32)

    def fn(self, name: str):
        f = self._fn.get(name)
        if f is None:
            f = self._fn[name] = self.module.get_function(name)
        return f

    def _blocks_per_sm(self, f, smem: int) -> int:
        key = (id(f), smem)
        n = self._occupancy.get(key)
        if n is None:
            self._set_smem(f, smem)
            try:
                from cupy_backends.cuda.api import driver
                n = int(driver.occupancyMaxActiveBlocksPerMultiprocessor(f.kernel.ptr, GEMV_THREADS, smem))
            except Exception:  # noqa: BLE001 - an estimate: blocks by registers, shared memory permitting
                n = min(65536 // (max(1, f.attributes["num_regs"]) * GEMV_THREADS),
                        (227 * 1024) // (smem + 1024 + 128))
            n = self._occupancy[key] = max(1, n)
        return n

    def compile_all(self) -> None:
        """Load every kernel now (compilation is cached on disk by CuPy), not on the first step."""
        for name in gemv_kernel_names():
            if self.bulk != "never" or not name.startswith("gemvb_"):
                self.fn(name)
        for name in ("embed_row", "qkv_post", "softmax_rows", "add_rmsnorm", "resid_add_f32", "silu_mul", "argmax_f32"):
            self.fn(name)

    def attn_fns(self, g: int, d: int):
        key = (g, d)
        if key not in self._attn:
            c = attn_chunk(self.dtype_name, g, d)
            nt = attn_threads(d)
            jl = max(1, nt // d) if d <= 128 else 1
            opts = self.options + (f"-DATT_G={g}", f"-DATT_D={d}", f"-DATT_C={c}", f"-DATT_NT={nt}", f"-DATT_JL={jl}")
            mod = self.cp.RawModule(code=CUDA_BASE + CUDA_ATTN, options=opts)
            self._attn[key] = (mod.get_function("attn_split"), mod.get_function("attn_combine"), c, nt)
            self._attn_modules[key] = mod
        return self._attn[key]

    # -- helpers
    @staticmethod
    def _ptr(a) -> int:
        return 0 if a is None else a.data.ptr

    def _set_smem(self, f, nbytes: int) -> None:
        """A kernel whose dynamic plus static shared memory is over 48 KiB must say so first."""
        if self._smem_set.get(id(f), -1) < nbytes:
            if nbytes + f.attributes["shared_size_bytes"] > 48 * 1024:
                f.max_dynamic_shared_size_bytes = nbytes
            self._smem_set[id(f)] = nbytes

    # -- kernels
    def embed_row(self, table, meta, tokens, x) -> None:
        h = x.shape[-1]
        self.fn("embed_row")(((h + 255) // 256,), (256,), (table, meta, tokens, x, np.int32(h)))

    def gemv_rows_per_warp(self, n: int, epi: str, pro: str, capacity: int | None = None) -> int:
        """2 when one row per warp would need a second (partial) wave of blocks and two would not."""
        if epi == "silu_pair" or pro == "silu" or n % 2:
            return 1
        capacity = capacity or self.sm_count * GEMV_BLOCKS_PER_SM
        one, two = ceil_div(n, GEMV_ROWS_PER_BLOCK), ceil_div(n, 2 * GEMV_ROWS_PER_BLOCK)
        return 2 if one > capacity >= two else 1

    @staticmethod
    def gemv_smem(pro: str, k: int, item: int, resid_bias: bool) -> int:
        """Dynamic shared memory of the GEMV: the input vector, plus the staged prologue inputs."""
        vec_bytes = k * item
        if pro == "none":
            return vec_bytes
        if pro in ("rms", "silu"):
            return 2 * vec_bytes
        return 2 * vec_bytes + 4 * k + (vec_bytes if resid_bias else 0)  # resid_rms: + float32 sum, bias

    def gemv_plan(self, n: int, k: int, item: int, pro: str, epi: str, rows_per_warp: int | None = None,
                  blocks: int | None = None, resid_bias: bool = False) -> dict:
        """Kernel name, grid, rows per warp and shared memory of one GEMV launch (n outputs: for
        "silu_pair" the number of gate/up pairs)."""
        smem = self.gemv_smem(pro, k, item, resid_bias)
        if smem > GEMV_SMEM_MAX:
            raise ValueError(f"GEMV input of {k} elements needs {smem} bytes of shared memory (at most {GEMV_SMEM_MAX})")
        if self.bulk == "always" or (self.bulk == "auto" and k * item <= GEMVB_ROW_MAX):
            plan = self.gemv_bulk_plan(n, k, item, pro, epi, smem, blocks, rows_per_warp)
            if plan is not None:
                return plan
        base = f"gemv_p{PRO[pro]}_e{EPI[epi]}_b{{b}}"
        capacity = self.sm_count * self._blocks_per_sm(self.fn(base.format(b=0)), smem)
        r = rows_per_warp or self.gemv_rows_per_warp(n, epi, pro, capacity)
        units = n // r if epi != "silu_pair" else n
        grid = blocks or min(ceil_div(units, GEMV_ROWS_PER_BLOCK), capacity)
        return dict(base=base, r=r, smem=smem, units=units, grid=grid)

    def gemv_bulk_plan(self, n: int, k: int, item: int, pro: str, epi: str, stage: int,
                       blocks: int | None, rows_per_warp: int | None) -> dict | None:
        """The bulk-copy GEMV's launch: one block per SM (or `blocks`), each a contiguous range of
        units and as many one-unit slots as its shared memory holds after the staged prologue
        inputs and the 2 mbarriers per slot. A unit is two rows where rows are under
        bulk_pair_below bytes (one copy, two independent sums per warp), or rows_per_warp. None when fewer than 2 slots fit
        (the register kernel then runs)."""
        r = rows_per_warp or (2 if k * item < self.bulk_pair_below and n % 2 == 0 else 1)
        if epi == "silu_pair" or pro == "silu" or n % r:
            r = 1
        if epi == "rope":   # a unit is a rotation pair (or two v rows) whatever the row size
            r = 2
        unit_bytes = k * item * (2 if epi == "silu_pair" else r)
        units = n // r
        grid = min(blocks or self.sm_count, units)
        upb = ceil_div(units, grid)
        grid = ceil_div(units, upb)
        base = f"gemvb_p{PRO[pro]}_e{EPI[epi]}_b{{b}}"
        name = base.format(b=0) + ("_r2" if r == 2 and epi != "rope" else "")
        budget = self.smem_optin - self.fn(name).attributes["shared_size_bytes"]
        bar_off = ceil_div(stage, 8) * 8

        def slot_off(slots: int) -> int:
            return ceil_div(bar_off + 16 * slots, 128) * 128

        slots = min(upb, (budget - slot_off(0)) // unit_bytes)
        while slots > 0 and slot_off(slots) + slots * unit_bytes > budget:
            slots -= 1
        if slots < 2:
            return None
        consumers = self.bulk_consumers
        if slots < upb:  # the ring wraps: each slot read by one consumer warp (nc divides slots)
            consumers = min(consumers, slots)
            slots -= slots % consumers
        smem = slot_off(slots) + slots * unit_bytes
        return dict(base=base, r=r, smem=smem, units=units, grid=grid,
                    bulk=tuple(np.int32(v) for v in (upb, slots, consumers, bar_off, slot_off(slots))))

    def gemv(self, W, xin, out, pro: str, epi: str, norm_w=None, eps: float = 0.0, bias=None, outf=None,
             rows_per_warp: int | None = None, resid=None, resid_bias=None, xout=None,
             blocks: int | None = None) -> None:
        """pro "resid_rms": the input is xin + T(resid) (+ resid_bias), resid a float32 sum over TP ranks,
        rounded as resid_add_f32 rounds; that new residual is stored to xout, then RMSNorm as "rms".
        rows_per_warp and blocks (the grid; default: at most one wave) choose how, never what, is
        computed."""
        n, k = W.shape
        if (pro == "resid_rms") != (resid is not None and xout is not None):
            raise ValueError("pro resid_rms takes resid (float32) and xout")
        if epi == "silu_pair":
            n //= 2  # outputs: one per (gate row, up row) pair
        if epi == "partial" and bias is not None:
            raise ValueError("a partial (row-parallel) product takes its bias after the sum: resid_add_f32")
        key = (n, k, W.dtype.itemsize, pro, epi, rows_per_warp, blocks, resid_bias is not None)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.gemv_plan(*key)
        b = 1 if (bias is not None and epi != "logits") else 0
        f = self.fn(plan["base"].format(b=b) + ("_r2" if plan["r"] == 2 else ""))
        self._set_smem(f, plan["smem"])
        args = (W, xin, self._ptr(norm_w), self._ptr(bias), self._ptr(out), self._ptr(outf), np.int32(n),
                np.int32(k), np.float32(eps), self._ptr(resid), self._ptr(resid_bias), self._ptr(xout))
        if "bulk" in plan:
            launch(f, (plan["grid"],), (self.bulk_threads,), args + plan["bulk"], plan["smem"])
        else:
            launch(f, (plan["grid"],), (GEMV_THREADS,), args + (np.int32(programmatic()),), plan["smem"])

    def _rope_plan(self, n: int, k: int, item: int) -> dict | None:
        key = ("rope", n, k, item)
        if key not in self._plans:
            smem = self.gemv_smem("rms", k, item, False)
            fits = self.bulk != "never" and k * item <= GEMVB_ROW_MAX and n % 2 == 0 and smem <= GEMV_SMEM_MAX
            self._plans[key] = self.gemv_bulk_plan(n, k, item, "rms", "rope", smem, None, 2) if fits else None
        return self._plans[key]

    def can_rope(self, W) -> bool:
        """Whether gemv_rope runs this q/k/v weight (rope_epilogue on; the bulk-copy GEMV, sm_90+)."""
        return self.rope_epilogue and self._rope_plan(W.shape[0], W.shape[1], W.dtype.itemsize) is not None

    def gemv_rope(self, W, xin, norm_w, eps: float, bias, positions, cos_table, sin_table, slots, q, k_cache,
                  v_cache, hq: int, hkv: int, d: int) -> None:
        """One token's q/k/v product from RMSNorm(xin) (+ bias), rotated and written: q [hq, d], k and
        v into slot slots[0] of k_cache / v_cache [slots, hkv, d] (the "rope" epilogue)."""
        n, k = W.shape
        plan = self._rope_plan(n, k, W.dtype.itemsize)
        f = self.fn(plan["base"].format(b=1 if bias is not None else 0))
        self._set_smem(f, plan["smem"])
        args = ((W, xin, self._ptr(norm_w), self._ptr(bias), 0, 0, np.int32(n), np.int32(k), np.float32(eps), 0, 0, 0)
                + plan["bulk"] + (positions, cos_table, sin_table, slots, q, k_cache, v_cache, np.int32(hq),
                                  np.int32(hkv), np.int32(d)))
        launch(f, (plan["grid"],), (self.bulk_threads,), args, plan["smem"])

    def qkv_post(self, qkv, meta, tn: int, bias, qn, kn, cos, sin, qout, kcache, vcache,
                 hq: int, hkv: int, d: int, eps: float) -> None:
        maxc = kcache.shape[2]
        self.fn("qkv_post")((tn, hq + hkv), (d // 2,), (
            qkv, self._ptr(bias), self._ptr(qn), self._ptr(kn), cos, sin, qout, kcache, vcache, meta,
            np.int32(tn), np.int32(hq), np.int32(hkv), np.int32(d), np.int32(maxc), np.float32(eps),
            np.int32(bias is not None), np.int32(qn is not None)))

    def attn_splits(self, g: int, d: int, maxc: int) -> int:
        c = attn_chunk(self.dtype_name, g, d)
        return (maxc + c - 1) // c

    def attn_decode(self, q, kcache, vcache, meta, window: int, scale: float, po, pm, pl, out,
                    hq: int, hkv: int, d: int) -> None:
        g = hq // hkv
        split, combine, c, nt = self.attn_fns(g, d)
        maxc = kcache.shape[2]
        ns = (maxc + c - 1) // c
        split((ns, hkv), (nt,), (q, kcache, vcache, meta, po, pm, pl, np.int32(hkv), np.int32(maxc),
                                 np.int32(window or 0), np.float32(scale)))
        self._set_smem(combine, ns * 4)
        combine((hq,), (nt,), (po, pm, pl, out, meta, np.int32(ns)), shared_mem=ns * 4)

    def softmax_rows(self, S, meta, t0: int, g: int, window: int, scale: float) -> None:
        hkv, m, lc = S.shape
        self.fn("softmax_rows")((m, hkv), (256,), (S, meta, np.int32(m), np.int32(lc), np.int32(g), np.int32(t0),
                                                  np.int32(window or 0), np.float32(scale)))

    def add_rmsnorm(self, x, delta, w, eps: float, h) -> None:
        rows, hid = x.shape
        self.fn("add_rmsnorm")((rows,), (256,), (x, self._ptr(delta), w, h, np.int32(hid), np.float32(eps),
                                                np.int32(delta is not None)))

    def resid_add_f32(self, x, s, bias=None, w=None, eps: float = 0.0, h=None) -> None:
        """x (+)= T(s) (+ bias) per row; then h = RMSNorm(x) * w when h is given. x [rows, H] or [H]."""
        hid = x.shape[-1]
        rows = x.size // hid
        self.fn("resid_add_f32")((rows,), (256,), (x, s, self._ptr(bias), self._ptr(w), self._ptr(h), np.int32(hid),
                                                  np.float32(eps), np.int32(bias is not None)))

    def silu_mul(self, gu, out) -> None:
        tn, inter = out.shape
        blocks = min((tn * inter + 255) // 256, 65535)
        self.fn("silu_mul")((blocks,), (256,), (gu, out, np.int32(tn), np.int32(inter)))

    def argmax(self, logits, out, meta=None) -> None:
        """out[meta[1]] (the slot's entry) or out[0] = argmax(logits), first index among ties."""
        self.fn("argmax_f32")((1,), (1024,), (logits, np.int32(logits.size), out, self._ptr(meta)))

    # -- cuBLAS (row-major views; cuBLAS is column-major, so each product is computed transposed)
    def linear(self, x, W):
        """x [T, K] @ W[N, K]^T in T with float32 accumulation (cupy's matmul: cublasGemmEx, no copies)."""
        return x @ W.T

    def linear_f32(self, x, W, out=None):
        """x [T, K] @ W[N, K]^T with float32 accumulation and a float32 result (no rounding to T):
        a tensor-parallel rank's partial of a row-parallel product, summed over ranks before rounding."""
        tn, k = x.shape
        n = W.shape[0]
        if out is None:
            out = self.cp.empty((tn, n), dtype=np.float32)
        # column-major view: out^T [n, tn] = W [n, k] (col-major: W^T, lda k) op ... as in attn_scores
        self.cublas.gemmEx(
            self.cp.cuda.device.get_cublas_handle(), 1, 0, n, tn, k, self._one.ctypes.data,
            W.data.ptr, self.cuda_dtype, k, x.data.ptr, self.cuda_dtype, k,
            self._zero.ctypes.data, out.data.ptr, self.runtime.CUDA_R_32F, n,
            self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)
        return out

    def attn_scores(self, q, kcache, slot: int, t0: int, c: int, lc: int, S) -> None:
        """S[h] = Q[h, t0:t0+c] @ K[h, :lc]^T for every kv head h; q [Hkv, Tn, g, D], S [Hkv, c*g, lc]."""
        hkv, tn, g, d = q.shape
        maxc = kcache.shape[2]
        item = q.dtype.itemsize
        m = c * g
        kptr = kcache.data.ptr + slot * hkv * maxc * d * item
        qptr = q.data.ptr + t0 * g * d * item
        self.cublas.gemmStridedBatchedEx(
            self.cp.cuda.device.get_cublas_handle(), 1, 0, lc, m, d, self._one.ctypes.data,
            kptr, self.cuda_dtype, d, maxc * d,
            qptr, self.cuda_dtype, d, tn * g * d,
            self._zero.ctypes.data, S.data.ptr, self.cuda_dtype, lc, m * lc,
            hkv, self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)

    def attn_pv(self, S, vcache, slot: int, out) -> None:
        """out[h] = P[h] @ V[h, :lc] for every kv head h; S [Hkv, m, lc] (probabilities), out [Hkv, m, D]."""
        hkv, m, lc = S.shape
        d = out.shape[-1]
        maxc = vcache.shape[2]
        item = S.dtype.itemsize
        vptr = vcache.data.ptr + slot * hkv * maxc * d * item
        self.cublas.gemmStridedBatchedEx(
            self.cp.cuda.device.get_cublas_handle(), 0, 0, d, m, lc, self._one.ctypes.data,
            vptr, self.cuda_dtype, d, maxc * d,
            S.data.ptr, self.cuda_dtype, lc, m * lc,
            self._zero.ctypes.data, out.data.ptr, self.cuda_dtype, d, m * d,
            hkv, self.cublas.CUBLAS_COMPUTE_32F, self.cublas.CUBLAS_GEMM_DEFAULT)


# --------------------------------------------------------------------------- NumPy mirror

class NumpyOps:
    """The kernels' arithmetic in NumPy (same rounding points, same split-K attention)."""

    def __init__(self, dtype_name: str):
        self.dtype_name = dtype_name
        self.T = DTYPES[dtype_name]

    def ft(self, a):
        return np.asarray(a, dtype=np.float32).astype(self.T)

    def tf(self, a):
        return np.asarray(a).astype(np.float32)

    def r(self, a):
        """Round float32 values to T and back (the value a T register or array would hold)."""
        return self.tf(self.ft(a))

    def compile_all(self) -> None:
        pass


    def attn_splits(self, g: int, d: int, maxc: int) -> int:
        c = attn_chunk(self.dtype_name, g, d)
        return (maxc + c - 1) // c

    def embed_row(self, table, meta, tokens, x) -> None:
        token = int(meta[2]) if meta[2] >= 0 else int(tokens[int(meta[1])])
        x[...] = table[token]

    def _silu(self, g):
        with np.errstate(over="ignore"):
            return self.r(g / (np.float32(1.0) + np.exp(-g)))

    def _prologue(self, xin, pro: str, norm_w, eps: float, k: int):
        if pro == "none":
            return self.tf(xin)
        if pro == "rms":
            x = self.tf(xin)
            denom = np.sqrt(np.float32((x * x).sum(dtype=np.float32) / np.float32(k)) + np.float32(eps))
            return self.r(self.tf(norm_w) * self.r(x / denom))
        g, u = self.tf(xin[:k]), self.tf(xin[k:2 * k])
        return self.r(self._silu(g) * u)

    def gemv(self, W, xin, out, pro: str, epi: str, norm_w=None, eps: float = 0.0, bias=None, outf=None,
             rows_per_warp: int | None = None, resid=None, resid_bias=None, xout=None,
             blocks: int | None = None) -> None:
        # rows_per_warp, blocks: how the CUDA kernel splits the work; the function
        # (float32 dot products, the same rounding points) is the same for all of them
        n, k = W.shape
        if pro == "resid_rms":
            xout[...] = xin
            self.resid_add_f32(xout, resid, resid_bias)
            xin, pro = xout, "rms"
        x = self._prologue(xin.reshape(-1), pro, norm_w, eps, k)
        acc = self.tf(W) @ x
        if epi == "logits":
            outf[...] = self.r(acc)
            return
        if epi == "partial":
            outf[...] = acc.reshape(outf.shape)
            return
        y = self.r(acc)
        if bias is not None:
            y = self.r(y + self.tf(bias))
        if epi == "silu_pair":
            half = n // 2
            out[...] = self.ft(self._silu(y[:half]) * y[half:]).reshape(out.shape)
            return
        if epi == "resid":
            out[...] = self.ft(self.tf(out) + y).reshape(out.shape)
        else:
            out[...] = self.ft(y).reshape(out.shape)

    def can_rope(self, W) -> bool:
        return W.shape[0] % 2 == 0

    def gemv_rope(self, W, xin, norm_w, eps: float, bias, positions, cos_table, sin_table, slots, q, k_cache,
                  v_cache, hq: int, hkv: int, d: int) -> None:
        qkv = np.empty(W.shape[0], dtype=self.T)
        self.gemv(W, xin, qkv, "rms", "store", norm_w=norm_w, eps=eps, bias=bias)
        position, slot = int(positions[0]), int(slots[0])
        # the rotation the kernel repeats (its __fmul_rn / __fadd_rn are these float32 ops)
        rotated = apply_rope(np, qkv[:(hq + hkv) * d].reshape(1, hq + hkv, d), cos_table[position:position + 1],
                             sin_table[position:position + 1])[0]
        q.reshape(hq, d)[...] = rotated[:hq]
        k_cache[slot] = rotated[hq:]
        v_cache[slot] = qkv[(hq + hkv) * d:].reshape(hkv, d)

    def qkv_post(self, qkv, meta, tn: int, bias, qn, kn, cos, sin, qout, kcache, vcache,
                 hq: int, hkv: int, d: int, eps: float) -> None:
        start, slot = int(meta[0]), int(meta[1])
        half, g = d // 2, hq // hkv
        x = self.tf(qkv.reshape(tn, -1)).reshape(tn, hq + 2 * hkv, d)
        if bias is not None:
            x = self.r(x + self.tf(bias).reshape(hq + 2 * hkv, d))
        qk = x[:, :hq + hkv]
        if qn is not None:
            w = np.concatenate([np.broadcast_to(self.tf(qn), (hq, d)), np.broadcast_to(self.tf(kn), (hkv, d))])
            denom = np.sqrt((qk * qk).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(d) + np.float32(eps))
            qk = self.r(w * self.r(qk / denom))
        c = cos[start:start + tn][:, None, :]
        s = sin[start:start + tn][:, None, :]
        a, b = qk[..., :half], qk[..., half:]
        o = np.concatenate([a * c[..., :half] - b * s[..., :half], b * c[..., half:] + a * s[..., half:]], axis=-1)
        o = self.ft(o)
        qout[...] = o[:, :hq].reshape(tn, hkv, g, d).transpose(1, 0, 2, 3)
        kcache[slot, :, start:start + tn] = o[:, hq:].transpose(1, 0, 2)
        vcache[slot, :, start:start + tn] = self.ft(x[:, hq + hkv:]).transpose(1, 0, 2)

    def attn_decode(self, q, kcache, vcache, meta, window: int, scale: float, po, pm, pl, out,
                    hq: int, hkv: int, d: int) -> None:
        pos, slot = int(meta[0]), int(meta[1])
        g = hq // hkv
        c = attn_chunk(self.dtype_name, g, d)
        ns = po.shape[1]
        qf = self.tf(q).reshape(hkv, g, d)
        first = max(0, pos - window + 1) if window else 0
        for h in range(hkv):
            for s in range(ns):
                lo, hi = max(s * c, first), min(s * c + c, pos + 1)
                rows = slice(h * g, h * g + g)
                if lo >= hi:
                    pm[rows, s], pl[rows, s] = -np.inf, 0.0
                    continue
                k = self.tf(kcache[slot, h, lo:hi])
                v = self.tf(vcache[slot, h, lo:hi])
                sc = self.r(qf[h] @ k.T) * np.float32(scale)
                m = sc.max(axis=-1)
                p = np.exp(sc - m[:, None])
                total = p.sum(axis=-1, dtype=np.float32)
                if lo == first and hi == pos + 1:  # the whole context in one split: plain-path rounding
                    p, total = self.r(p / total[:, None]), np.ones_like(total)
                pm[rows, s], pl[rows, s] = m, total
                po[rows, s] = p @ v
        M = np.where(pl > 0, pm, -np.inf).max(axis=1, keepdims=True)
        w = np.where(pl > 0, np.exp(np.where(pl > 0, pm, M) - M), 0.0).astype(np.float32)
        num = (w[:, :, None] * np.where(pl[:, :, None] > 0, po, 0.0)).sum(axis=1)
        den = (w * pl).sum(axis=1)
        out[...] = self.ft(num / den[:, None]).reshape(out.shape)

    def softmax_rows(self, S, meta, t0: int, g: int, window: int, scale: float) -> None:
        hkv, m, lc = S.shape
        qpos = int(meta[0]) + t0 + np.arange(m) // g
        k = np.arange(lc)
        valid = k[None, :] <= qpos[:, None]
        if window:
            valid &= k[None, :] >= (qpos - window + 1)[:, None]
        sc = np.where(valid, self.tf(S) * np.float32(scale), -np.inf)
        mx = sc.max(axis=-1, keepdims=True)
        p = np.where(valid, np.exp(sc - mx), 0.0).astype(np.float32)
        S[...] = self.ft(p / p.sum(axis=-1, keepdims=True))

    def add_rmsnorm(self, x, delta, w, eps: float, h) -> None:
        if delta is not None:
            x[...] = self.ft(self.tf(x) + self.tf(delta))
        xf = self.tf(x)
        denom = np.sqrt((xf * xf).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(x.shape[-1]) + np.float32(eps))
        h[...] = self.ft(self.tf(w) * self.r(xf / denom))

    def resid_add_f32(self, x, s, bias=None, w=None, eps: float = 0.0, h=None) -> None:
        y = self.r(np.asarray(s, dtype=np.float32))
        if bias is not None:
            y = self.r(y + self.tf(bias))
        x[...] = self.ft(self.tf(x) + y)
        if h is not None:
            xf = self.tf(x)
            denom = np.sqrt((xf * xf).sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(x.shape[-1])
                            + np.float32(eps))
            h[...] = self.ft(self.tf(w) * self.r(xf / denom))

    def silu_mul(self, gu, out) -> None:
        inter = out.shape[-1]
        out[...] = self.ft(self._silu(self.tf(gu[:, :inter])) * self.tf(gu[:, inter:]))

    def argmax(self, logits, out, meta=None) -> None:
        out[0 if meta is None else int(meta[1])] = int(np.argmax(logits))

    def linear(self, x, W):
        return self.ft(self.tf(x) @ self.tf(W).T)

    def linear_f32(self, x, W, out=None):
        y = self.tf(x) @ self.tf(W).T
        if out is not None:
            out[...] = y
            return out
        return y

    def attn_scores(self, q, kcache, slot: int, t0: int, c: int, lc: int, S) -> None:
        hkv, tn, g, d = q.shape
        qc = self.tf(q[:, t0:t0 + c]).reshape(hkv, c * g, d)
        k = self.tf(kcache[slot, :, :lc])
        S[...] = self.ft(qc @ k.transpose(0, 2, 1))

    def attn_pv(self, S, vcache, slot: int, out) -> None:
        lc = S.shape[-1]
        out[...] = self.ft(self.tf(S) @ self.tf(vcache[slot, :, :lc]))


def softmax_scale(head_dim: int) -> float:
    """The plain path multiplies float32 scores by 1/sqrt(d) as a Python float (float32 on use)."""
    return float(np.float32(1.0 / float(head_dim) ** 0.5))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["CudaOps", "NumpyOps", "supports", "attn_chunk", "attn_threads", "softmax_scale", "ceil_div"]
