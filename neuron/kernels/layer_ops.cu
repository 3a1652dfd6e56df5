// The batch's element-wise layer ops, one launch each where the plain path takes several:
// RMSNorm (with the residual add before it), rotary embedding of q and k with k and v written
// into their paged slots, and silu(gate) * up. Every product and sum is rounded as the plain
// path (neuron/layers/ops.py) rounds it, with no contraction into FMAs, so a row's result is the
// plain path's up to the order of the RMSNorm's sum of squares. Compiled per dtype with -DDT.
#include "dtype.cuh"

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        v = warp_sum(v);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

// out = w * T(x / sqrt(mean(x^2) + eps)) per row of h elements; one block per row.
// With delta, x += delta first (rounded to T) and the new x is stored: the residual add.
extern "C" __global__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                        T* __restrict__ out, int h, float eps) {
    const long long base = (long long)blockIdx.x * h;
    float squares = 0.f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = tf(x[base + j]);
        if (delta != nullptr) {
            v = tf(ft(__fadd_rn(v, tf(delta[base + j]))));
            x[base + j] = ft(v);
        }
        squares = __fadd_rn(squares, __fmul_rn(v, v));
    }
    const float root = __fsqrt_rn(__fadd_rn(__fdiv_rn(block_sum(squares), (float)h), eps));
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float normed = tf(ft(__fdiv_rn(tf(x[base + j]), root)));
        out[base + j] = ft(__fmul_rn(tf(w[j]), normed));
    }
}

// Token t's row of qkv [T, (hq + 2 hkv) d]: q heads, k heads, v heads. q and k are rotated
// (rotate-half form, cos/sin [max_context, d] float32 at positions[t]); q goes to q_out [T, hq, d],
// k and v to slot slots[t] of the layer's flat caches [slots, hkv, d]. One block per token.
extern "C" __global__ void rope_write_kv(const T* __restrict__ qkv, const int* __restrict__ positions,
                                         const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                         const long long* __restrict__ slots, T* __restrict__ q_out,
                                         T* __restrict__ k_cache, T* __restrict__ v_cache, int hq, int hkv, int d) {
    const int t = blockIdx.x;
    const int half = d / 2;
    const T* row = qkv + (long long)t * (hq + 2 * hkv) * d;
    const float* c = cos_table + (long long)positions[t] * d;
    const float* s = sin_table + (long long)positions[t] * d;
    const long long slot = slots[t];
    for (int i = threadIdx.x; i < (hq + hkv) * half; i += blockDim.x) {
        const int head = i / half, j = i % half;
        const float a = tf(row[head * d + j]), b = tf(row[head * d + j + half]);
        const float lo = __fadd_rn(__fmul_rn(a, c[j]), __fmul_rn(-b, s[j]));
        const float hi = __fadd_rn(__fmul_rn(b, c[j + half]), __fmul_rn(a, s[j + half]));
        T* dst = head < hq ? q_out + ((long long)t * hq + head) * d : k_cache + (slot * hkv + (head - hq)) * d;
        dst[j] = ft(lo);
        dst[j + half] = ft(hi);
    }
    const T* v = row + (hq + hkv) * d;
    for (int i = threadIdx.x; i < hkv * d; i += blockDim.x) v_cache[slot * hkv * d + i] = v[i];
}

// out [T, inter] = T(silu(gate)) * up, gate_up [T, 2 inter] (gate columns first).
extern "C" __global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int inter, long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i / inter;
        const int j = (int)(i - t * inter);
        const T* row = gate_up + t * 2 * inter;
        const float g = tf(row[j]);
        const float activated = tf(ft(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g)))));
        out[i] = ft(__fmul_rn(activated, tf(row[inter + j])));
    }
}
