// Greedy picks of a turn: out[j] = argmax over logits[rows[j], :vocab] (float32), in two passes:
// argmax_chunks, grid (rows, chunks), takes the best of ARGMAX_CHUNK consecutive ids per block, and
// argmax_pick, one warp a row, the best of the row's chunks. One block walking a whole row (the
// first version) left one 128k-id pick at 0.08 ms, a tenth of a 1B decode turn: a single SM's
// dependent loads. (value, id) compared by `beats` is a total order, so any grouping of a row's ids
// gives the same pick: the first maximum wins and a NaN counts above every number (what NumPy's and CuPy's argmax
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

// ARGMAX_THREADS (threads a block of argmax_chunks) and ARGMAX_PER_THREAD (ids a thread) come from
// argmax.py, which sizes the grid with them.
#define ARGMAX_CHUNK (ARGMAX_THREADS * ARGMAX_PER_THREAD)

// The best (value, id) of the warp, in every lane.
__device__ __forceinline__ void warp_best(float& best, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(ov, oi, best, bi)) { best = ov; bi = oi; }
    }
}

// best[j, c] / best_id[j, c]: the pick among ids c * ARGMAX_CHUNK .. (c + 1) * ARGMAX_CHUNK - 1 of
// row rows[j]; a thread's loads are issued together before it compares them.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) argmax_chunks(
    const float* __restrict__ logits, const long long* __restrict__ rows, int vocab,
    float* __restrict__ best_value, int* __restrict__ best_id)
{
    __shared__ float warp_value[ARGMAX_THREADS / 32];
    __shared__ int warp_id[ARGMAX_THREADS / 32];
    const float* row = logits + rows[blockIdx.x] * (long long)vocab;
    const int first = blockIdx.y * ARGMAX_CHUNK + threadIdx.x;
    float v[ARGMAX_PER_THREAD];
#pragma unroll
    for (int j = 0; j < ARGMAX_PER_THREAD; ++j) {
        const int k = first + j * ARGMAX_THREADS;
        v[j] = k < vocab ? row[k] : -INFINITY;
    }
    float best = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < ARGMAX_PER_THREAD; ++j) {
        const int k = first + j * ARGMAX_THREADS;
        if (k < vocab && beats(v[j], k, best, bi)) { best = v[j]; bi = k; }
    }
    warp_best(best, bi);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { warp_value[warp] = best; warp_id[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const bool live = lane < ARGMAX_THREADS / 32;
        best = live ? warp_value[lane] : -INFINITY;
        bi = live ? warp_id[lane] : 0x7fffffff;
        warp_best(best, bi);
        if (lane == 0) {
            const size_t at = (size_t)blockIdx.x * gridDim.y + blockIdx.y;
            best_value[at] = best;
            best_id[at] = bi;
        }
    }
}

// out[j]: the best of row j's `chunks` picks (0 for a row with nothing above -inf: what argmax gives).
extern "C" __global__ void argmax_pick(const float* __restrict__ best_value, const int* __restrict__ best_id,
                                       int chunks, long long* __restrict__ out)
{
    const int lane = threadIdx.x;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int c = lane; c < chunks; c += 32) {
        const size_t at = (size_t)blockIdx.x * chunks + c;
        if (beats(best_value[at], best_id[at], best, bi)) { best = best_value[at]; bi = best_id[at]; }
    }
    warp_best(best, bi);
    if (lane == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
}
