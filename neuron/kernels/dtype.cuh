// Storage type T and float conversions, chosen by -DDT: 0 bfloat16, 1 float16, 2 float32.
// bf16/f16 are handled as raw 16-bit values so NVRTC needs no CUDA headers.
#pragma once
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#if DT == 0
typedef unsigned short T;
__device__ __forceinline__ float tf(T v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ T ft(float f) {  // round to nearest even; NaN stays NaN
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

// A 16-byte vector -> VEC floats.
__device__ __forceinline__ void unpack16(const uint4& v, float* f) {
#if DT == 2
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y); f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
#else
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { f[2 * i] = tf((T)(w[i] & 0xffffu)); f[2 * i + 1] = tf((T)(w[i] >> 16)); }
#endif
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

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
