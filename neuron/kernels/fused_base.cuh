
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
