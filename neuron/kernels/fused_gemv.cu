
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
            unpack16(s.xs[i], f);
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
            unpack16(s.xs[i], f);
            unpack16(s.st[i], g);
#pragma unroll
            for (int e = 0; e < VEC; ++e) f[e] = g[e] * tf(ft(f[e] / denom));
            s.xs[i] = pack(f);
        }
    } else if (P == 2) {
        for (int i = tid; i < NV; i += blockDim.x) {
            float g[VEC], u[VEC];
            unpack16(s.xs[i], g);
            unpack16(s.st[i], u);
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
