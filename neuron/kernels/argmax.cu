// Greedy picks of a turn: out[j] = argmax over logits[rows[j], :vocab] (float32), one block per row.
// The first maximum wins and a NaN counts above every number (what NumPy's and CuPy's argmax
// return), so a row's pick is the same whatever the batch. One module for every batch size: CuPy's
// argmax is a reduction compiled per shape (0.1-0.2 s of NVRTC for each new row count, measured on
// the H200), and it needs the rows gathered and copied first.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)   // NVRTC has no <math.h>
#endif

__device__ __forceinline__ bool beats(float v, int i, float best, int bi) {
    const bool vn = isnan(v), bn = isnan(best);
    if (vn != bn) return vn;
    if (vn || v == best) return i < bi;
    return v > best;
}

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, const long long* __restrict__ rows,
                                       int vocab, long long* __restrict__ out) {
    __shared__ float warp_best[32];
    __shared__ int warp_index[32];
    const float* row = logits + rows[blockIdx.x] * (long long)vocab;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int k = threadIdx.x; k < vocab; k += blockDim.x) {
        const float v = row[k];
        if (beats(v, k, best, bi)) { best = v; bi = k; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(ov, oi, best, bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { warp_best[warp] = best; warp_index[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const bool live = lane < (int)(blockDim.x >> 5);
        best = live ? warp_best[lane] : -INFINITY;
        bi = live ? warp_index[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (beats(ov, oi, best, bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}
