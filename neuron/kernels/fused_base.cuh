// What the fused engine's kernels (fused_gemv.cu, slot_attention.cu) share beyond dtype.cuh:
// 16-byte packs and dot products, block reductions, SiLU, cp.async copies.
#include "dtype.cuh"   // T, tf / ft, VEC, unpack16, warp_sum / warp_max, pdl_trigger / pdl_wait

// VEC floats -> a 16-byte vector.
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
    unpack16(a, fa); unpack16(b, fb);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc = fmaf(fa[i], fb[i], acc);
    return acc;
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
