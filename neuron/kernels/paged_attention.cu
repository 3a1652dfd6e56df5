// Paged decode attention: one query token per sequence against its KV blocks (GQA, split-K).
//
// KV cache layout, per layer: [num_blocks, block_size, kv_heads, head_dim]. Sequence b's position j
// lives in block block_tables[b][j / block_size] at offset j % block_size. Its query is at position
// context_lens[b] - 1 and its own key/value are already in the cache.
//
// Pass 1 (paged_decode_partial), grid (B, kv_heads, splits): one block takes one sequence, one kv
// head and PA_SPLIT consecutive keys, for all PA_G query heads that share that kv head, so every
// key and value is read once for the whole group. It writes the split's unnormalised output and its
// (max, sum) of exp. Pass 2 (paged_decode_combine), grid (B * q_heads): rescales the splits to the
// global max and normalises. Splits past a sequence's context write (-inf, 0) and are ignored.
//
// Compile-time: DT (dtype.cuh), PA_D head_dim (multiple of VEC), PA_G query heads per kv head,
// PA_THREADS threads per block (>= PA_D), PA_SPLIT keys per split.
#include "dtype.cuh"

#define PA_WARPS (PA_THREADS / 32)
#define PA_PARTS (PA_THREADS / PA_D)   // threads that share one output dim in the PV product

extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_decode_partial(
    const T* __restrict__ q,              // [B, kv_heads * PA_G, PA_D]
    const T* __restrict__ k_cache,
    const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, // [B, max_blocks]
    const int* __restrict__ context_lens, // [B]
    float* __restrict__ part_out,         // [B, q_heads, splits, PA_D]
    float* __restrict__ part_ml,          // [B, q_heads, splits, 2]
    int kv_heads, int block_size, int max_blocks, float scale, int window)
{
    const int b = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int q_heads = kv_heads * PA_G;
    const int ctx = context_lens[b];
    int lo = split * PA_SPLIT;
    const int hi = min(ctx, lo + PA_SPLIT);
    if (window > 0) lo = max(lo, ctx - window);  // the query at ctx - 1 sees keys above ctx - 1 - window
    const int n = hi - lo;

    __shared__ float sq[PA_G][PA_D];
    __shared__ float ss[PA_G][PA_SPLIT];
    __shared__ float sm[PA_G], sl[PA_G];
    __shared__ float sacc[PA_PARTS][PA_G][PA_D];

    const size_t row0 = (size_t)b * q_heads + (size_t)kvh * PA_G;  // first query head of the group
    if (n <= 0) {
        for (int i = tid; i < PA_G * PA_D; i += PA_THREADS) {
            const int g = i / PA_D, dd = i % PA_D;
            part_out[((row0 + g) * splits + split) * PA_D + dd] = 0.f;
        }
        for (int g = tid; g < PA_G; g += PA_THREADS) {
            part_ml[((row0 + g) * splits + split) * 2] = -INFINITY;
            part_ml[((row0 + g) * splits + split) * 2 + 1] = 0.f;
        }
        return;
    }
    for (int i = tid; i < PA_G * PA_D; i += PA_THREADS)
        sq[i / PA_D][i % PA_D] = tf(q[row0 * PA_D + i]) * scale;
    __syncthreads();

    // Scores: one thread per key, all PA_G heads at once.
    const int* table = block_tables + (size_t)b * max_blocks;
    for (int j = lo + tid; j < hi; j += PA_THREADS) {
        const int blk = table[j / block_size];
        const T* kp = k_cache + (((size_t)blk * block_size + j % block_size) * kv_heads + kvh) * PA_D;
        float acc[PA_G];
#pragma unroll
        for (int g = 0; g < PA_G; ++g) acc[g] = 0.f;
#pragma unroll 4
        for (int dd = 0; dd < PA_D; dd += VEC) {
            float kf[VEC];
            unpack16(*reinterpret_cast<const uint4*>(kp + dd), kf);
#pragma unroll
            for (int g = 0; g < PA_G; ++g)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[g] = fmaf(sq[g][dd + e], kf[e], acc[g]);
        }
#pragma unroll
        for (int g = 0; g < PA_G; ++g) ss[g][j - lo] = acc[g];
    }
    __syncthreads();

    // Softmax numerators per head: one warp per head.
    for (int g = warp; g < PA_G; g += PA_WARPS) {
        float m = -INFINITY;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, ss[g][j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float p = __expf(ss[g][j] - m);
            ss[g][j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (lane == 0) { sm[g] = m; sl[g] = l; }
    }
    __syncthreads();

    // P @ V: thread (part, dd) sums keys part, part + PA_PARTS, ... for dim dd of every head.
    const int dd = tid % PA_D, part = tid / PA_D;
    if (part < PA_PARTS) {
        float acc[PA_G];
#pragma unroll
        for (int g = 0; g < PA_G; ++g) acc[g] = 0.f;
        for (int j = part; j < n; j += PA_PARTS) {
            const int pos = lo + j;
            const int blk = table[pos / block_size];
            const float v = tf(v_cache[(((size_t)blk * block_size + pos % block_size) * kv_heads + kvh) * PA_D + dd]);
#pragma unroll
            for (int g = 0; g < PA_G; ++g) acc[g] = fmaf(ss[g][j], v, acc[g]);
        }
#pragma unroll
        for (int g = 0; g < PA_G; ++g) sacc[part][g][dd] = acc[g];
    }
    __syncthreads();
    for (int i = tid; i < PA_G * PA_D; i += PA_THREADS) {
        const int g = i / PA_D, d2 = i % PA_D;
        float total = 0.f;
#pragma unroll
        for (int p = 0; p < PA_PARTS; ++p) total += sacc[p][g][d2];
        part_out[((row0 + g) * splits + split) * PA_D + d2] = total;
    }
    for (int g = tid; g < PA_G; g += PA_THREADS) {
        part_ml[((row0 + g) * splits + split) * 2] = sm[g];
        part_ml[((row0 + g) * splits + split) * 2 + 1] = sl[g];
    }
}

extern "C" __global__ void paged_decode_combine(
    const float* __restrict__ part_out,   // [rows, splits, PA_D]
    const float* __restrict__ part_ml,    // [rows, splits, 2]
    T* __restrict__ out,                  // [rows, PA_D]
    int splits)
{
    const size_t row = blockIdx.x;
    const float* ml = part_ml + row * splits * 2;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, ml[2 * s]);
    float denom = 0.f;
    for (int s = 0; s < splits; ++s) denom += ml[2 * s + 1] > 0.f ? ml[2 * s + 1] * __expf(ml[2 * s] - m) : 0.f;
    for (int dd = threadIdx.x; dd < PA_D; dd += blockDim.x) {
        float numer = 0.f;
        for (int s = 0; s < splits; ++s)
            if (ml[2 * s + 1] > 0.f) numer += part_out[(row * splits + s) * PA_D + dd] * __expf(ml[2 * s] - m);
        out[row * PA_D + dd] = ft(denom > 0.f ? numer / denom : 0.f);
    }
}
