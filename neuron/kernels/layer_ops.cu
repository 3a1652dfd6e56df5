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
                                         T* __restrict__ k_cache, T* __restrict__ v_cache, int hq, int hkv, int d, int pdl) {
    if (pdl) {   // launched programmatically (kernels/launch.py): qkv is the running kernel's output
        pdl_trigger();
        pdl_wait();
    }
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

// ---- The same three ops on 16-byte vectors (VEC elements a load), for the shapes that allow it:
// the scalar kernels above made a decode turn's norms, rotary and silu take 12x their bytes' time
// (bench/NOTES.md). Element for element the arithmetic is the scalar kernels'; the RMSNorm's sum of
// squares is taken in another (fixed) order.

__device__ __forceinline__ uint4 pack16(const float* f) {
#if DT == 2
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
#else
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (unsigned)ft(f[2 * i]) | ((unsigned)ft(f[2 * i + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
#endif
}

#define NORM_CHUNKS 4   // VEC-element chunks a thread holds: h <= NORM_CHUNKS * VEC * blockDim.x

// add_rms_norm with h % VEC == 0: the row stays in registers between the sum and the scaling.
extern "C" __global__ void add_rms_norm_vec(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                            T* __restrict__ out, int h, float eps) {
    const long long base = (long long)blockIdx.x * h;
    const int chunks = h / VEC;
    float v[NORM_CHUNKS][VEC];
    float squares = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_CHUNKS; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < chunks) {
            uint4* xp = reinterpret_cast<uint4*>(x + base) + c;
            unpack16(*xp, v[k]);
            if (delta != nullptr) {
                float d[VEC];
                unpack16(reinterpret_cast<const uint4*>(delta + base)[c], d);
#pragma unroll
                for (int e = 0; e < VEC; ++e) v[k][e] = tf(ft(__fadd_rn(v[k][e], d[e])));
                *xp = pack16(v[k]);
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) squares = __fadd_rn(squares, __fmul_rn(v[k][e], v[k][e]));
        }
    }
    const float root = __fsqrt_rn(__fadd_rn(__fdiv_rn(block_sum(squares), (float)h), eps));
#pragma unroll
    for (int k = 0; k < NORM_CHUNKS; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < chunks) {
            float wf[VEC];
            unpack16(reinterpret_cast<const uint4*>(w)[c], wf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = __fmul_rn(wf[e], tf(ft(__fdiv_rn(v[k][e], root))));
            reinterpret_cast<uint4*>(out + base)[c] = pack16(v[k]);   // rounds each product once
        }
    }
}

// silu_mul with inter % VEC == 0: VEC outputs a thread.
extern "C" __global__ void silu_mul_vec(const T* __restrict__ gate_up, T* __restrict__ out, int inter, long long total) {
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < total;
         i += (long long)gridDim.x * blockDim.x * VEC) {
        const long long t = i / inter;
        const int j = (int)(i - t * inter);
        const T* row = gate_up + t * 2 * inter;
        float g[VEC], u[VEC];
        unpack16(*reinterpret_cast<const uint4*>(row + j), g);
        unpack16(*reinterpret_cast<const uint4*>(row + inter + j), u);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
            g[e] = __fmul_rn(tf(ft(__fdiv_rn(g[e], __fadd_rn(1.0f, expf(-g[e]))))), u[e]);
        *reinterpret_cast<uint4*>(out + i) = pack16(g);   // rounds each product once
    }
}

// Four consecutive elements <-> floats (8 bytes of 16-bit values, 16 of float32).
__device__ __forceinline__ void load4(const T* p, float* f) {
#if DT == 2
    const float4 v = *reinterpret_cast<const float4*>(p);
    f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
#else
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    f[0] = tf((T)(v.x & 0xffffu)); f[1] = tf((T)(v.x >> 16)); f[2] = tf((T)(v.y & 0xffffu)); f[3] = tf((T)(v.y >> 16));
#endif
}
__device__ __forceinline__ void store4(T* p, const float* f) {
#if DT == 2
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
#else
    *reinterpret_cast<uint2*>(p) = make_uint2((unsigned)ft(f[0]) | ((unsigned)ft(f[1]) << 16),
                                              (unsigned)ft(f[2]) | ((unsigned)ft(f[3]) << 16));
#endif
}

// rope_write_kv with d % 8 == 0: four rotation pairs a thread, v copied 16 bytes at a time.
extern "C" __global__ void rope_write_kv_vec(const T* __restrict__ qkv, const int* __restrict__ positions,
                                             const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                             const long long* __restrict__ slots, T* __restrict__ q_out,
                                             T* __restrict__ k_cache, T* __restrict__ v_cache, int hq, int hkv, int d, int pdl) {
    if (pdl) {   // launched programmatically (kernels/launch.py): qkv is the running kernel's output
        pdl_trigger();
        pdl_wait();
    }
    const int t = blockIdx.x;
    const int half = d / 2, quads = half / 4;
    const T* row = qkv + (long long)t * (hq + 2 * hkv) * d;
    const float* c = cos_table + (long long)positions[t] * d;
    const float* s = sin_table + (long long)positions[t] * d;
    const long long slot = slots[t];
    for (int i = threadIdx.x; i < (hq + hkv) * quads; i += blockDim.x) {
        const int head = i / quads, j = (i % quads) * 4;
        float a[4], b[4], lo[4], hi[4];
        load4(row + head * d + j, a);
        load4(row + head * d + j + half, b);
        const float4 c_lo = *reinterpret_cast<const float4*>(c + j), c_hi = *reinterpret_cast<const float4*>(c + j + half);
        const float4 s_lo = *reinterpret_cast<const float4*>(s + j), s_hi = *reinterpret_cast<const float4*>(s + j + half);
        const float cl[4] = {c_lo.x, c_lo.y, c_lo.z, c_lo.w}, ch[4] = {c_hi.x, c_hi.y, c_hi.z, c_hi.w};
        const float sl[4] = {s_lo.x, s_lo.y, s_lo.z, s_lo.w}, sh[4] = {s_hi.x, s_hi.y, s_hi.z, s_hi.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            lo[e] = __fadd_rn(__fmul_rn(a[e], cl[e]), __fmul_rn(-b[e], sl[e]));
            hi[e] = __fadd_rn(__fmul_rn(b[e], ch[e]), __fmul_rn(a[e], sh[e]));
        }
        T* dst = head < hq ? q_out + ((long long)t * hq + head) * d : k_cache + (slot * hkv + (head - hq)) * d;
        store4(dst + j, lo);
        store4(dst + j + half, hi);
    }
    const uint4* v = reinterpret_cast<const uint4*>(row + (hq + hkv) * d);
    uint4* v_dst = reinterpret_cast<uint4*>(v_cache + slot * hkv * d);
    for (int i = threadIdx.x; i < hkv * d / VEC; i += blockDim.x) v_dst[i] = v[i];
}
