// The sampler's draws without a sort, as top_filter.py's NumPy mirror defines them, one block of
// TF_THREADS a row: sample_weights turns scores into weights exp((s - max) / temperature), and
// top_filter_draw gives out[r], the id drawn from row r of them after top-k, top-p and min-p.
//
// The ranking (weight high to low, ties in id order) is never materialised. A cut of it is a key
// and a last id: the ids whose weight bits (the key: bits of a non-negative float rank as its value)
// are above the key, plus those equal to it up to the last id. A cut's key is found by radix
// selection, 8 bits a level from the top: a 256-bin histogram of the ids still in range, then the
// bin where the running count (top-k) or mass (top-p) from the top reaches the target. The last
// id among the ties is found by a scan in id order, as is the draw. Masses are integers
// (W = floor(w * 2^shift)), so the histograms' atomic adds and the block sums are exact in any
// order: every row gets the mirror's id, whatever the rows beside it.
#define TF_WARPS (TF_THREADS / 32)
#define FULL 0xffffffffu

typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ float clean(float w) { return isnan(w) ? 0.0f : w; }
__device__ __forceinline__ unsigned key_of(float w) { return __float_as_uint(clean(w)); }
__device__ __forceinline__ i64 mass_of(float w, double scale) { return (i64)floor((double)clean(w) * scale); }

// The ids above `key`, and those equal to it up to `last`.
struct Cut {
    unsigned key;
    int last;
    __device__ bool has(int i, unsigned k) const { return k > key || (k == key && i <= last); }
};

__device__ __forceinline__ i64 warp_sum(i64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

__device__ __forceinline__ i64 warp_inclusive(i64 v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const i64 t = __shfl_up_sync(FULL, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

// The sum over the block of every thread's v, in every thread.
__device__ i64 block_sum(i64 v) {
    __shared__ i64 partial[TF_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    return warp_sum(lane < TF_WARPS ? partial[lane] : 0);
}

// Ids with weight bits equal to `key` count 1 (the ties of a cut).
struct Ties {
    unsigned key;
    __device__ i64 operator()(int, float w) const { return key_of(w) == key ? 1 : 0; }
};

// A kept id counts its mass.
struct Kept {
    Cut k, p;
    float min_p;
    double scale;
    __device__ i64 operator()(int i, float w) const {
        const unsigned key = key_of(w);
        return k.has(i, key) && p.has(i, key) && clean(w) >= min_p ? mass_of(w, scale) : 0;
    }
};

// The first id whose running value (in id order) reaches target >= 1; the last id when none does.
// Each warp sums a contiguous range, warp 0 finds the range where the target falls, and that
// range's warp walks it 32 ids at a time.
template <class Value>
__device__ int find_nth(const float* __restrict__ row, int vocab, Value value, i64 target) {
    __shared__ i64 warp_total[TF_WARPS];
    __shared__ i64 found_base;
    __shared__ int found_warp, found;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int span = (vocab + TF_THREADS - 1) / TF_THREADS * 32;
    const int begin = warp * span, end = min(vocab, begin + span);
    i64 s = 0;
    for (int i = begin + lane; i < end; i += 32) s += value(i, row[i]);
    s = warp_sum(s);
    __syncthreads();
    if (lane == 0) warp_total[warp] = s;
    if (threadIdx.x == 0) { found = vocab - 1; found_warp = -1; found_base = 0; }
    __syncthreads();
    if (warp == 0) {
        const i64 t = lane < TF_WARPS ? warp_total[lane] : 0;
        const i64 inclusive = warp_inclusive(t, lane);
        if (inclusive - t < target && inclusive >= target) { found_warp = lane; found_base = inclusive - t; }
    }
    __syncthreads();
    if (warp == found_warp) {
        i64 run = found_base;
        for (int start = begin; start < end; start += 32) {
            const int i = start + lane;
            const i64 inclusive = warp_inclusive(i < end ? value(i, row[i]) : 0, lane);
            const unsigned hit = __ballot_sync(FULL, run + inclusive >= target);
            if (hit) {
                if (lane == __ffs(hit) - 1) found = i;
                break;
            }
            run += __shfl_sync(FULL, inclusive, 31);
        }
    }
    __syncthreads();
    return found;
}

struct Selected {
    unsigned key;
    i64 above, equal;   // count or mass of the ids in range above the key, and equal to it
};

// The key where the running count (MASS false) or mass of the ids in `range`, from the top, reaches
// target: above < target <= above + equal. The target must not exceed the range's total.
template <bool MASS>
__device__ Selected radix_select(const float* __restrict__ row, int vocab, double scale, Cut range, i64 target) {
    __shared__ i64 hist[256];
    __shared__ Selected pick;
    if (threadIdx.x == 0) pick = {0u, 0, 0};
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += TF_THREADS) hist[b] = 0;
        __syncthreads();
        const unsigned prefix = pick.key;
        const unsigned high = shift == 24 ? 0u : 0xffffffffu << (shift + 8);   // bits chosen so far
        for (int i = threadIdx.x; i < vocab; i += TF_THREADS) {
            const float w = row[i];
            const unsigned key = key_of(w);
            if ((key & high) == prefix && range.has(i, key)) {
                const i64 v = MASS ? mass_of(w, scale) : 1;
                if (v) atomicAdd(reinterpret_cast<u64*>(&hist[(key >> shift) & 255]), (u64)v);
            }
        }
        __syncthreads();
        if (threadIdx.x < 32) {   // lane l holds bins 255 - 8l down to 248 - 8l: the top first
            const int lane = threadIdx.x;
            i64 mine = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) mine += hist[255 - 8 * lane - j];
            const i64 inclusive = warp_inclusive(mine, lane);
            const i64 above = pick.above;
            __syncwarp();
            if (above + inclusive - mine < target && above + inclusive >= target) {
                i64 run = above + inclusive - mine;
                for (int j = 0; j < 8; ++j) {
                    const int b = 255 - 8 * lane - j;
                    if (run + hist[b] >= target) {
                        pick = {prefix | ((unsigned)b << shift), run, hist[b]};
                        break;
                    }
                    run += hist[b];
                }
            }
        }
        __syncthreads();
    }
    return pick;
}

// params[r] = (top_k (0: none), top_p (1: none), min_p (0: none), uniform in [0, 1), temperature)

// weights[r] = expf((scores[r] - max) / temperature), the max ignoring NaN (fmaxf), as the mirror's
// float32 arithmetic (expf and NumPy's exp may differ in the last bit)
extern "C" __global__ void __launch_bounds__(TF_THREADS) sample_weights(
    const float* __restrict__ scores, int vocab, const double* __restrict__ params, float* __restrict__ weights)
{
    __shared__ float warp_top[TF_WARPS];
    const float* row = scores + (size_t)blockIdx.x * vocab;
    float* w = weights + (size_t)blockIdx.x * vocab;
    const float temperature = (float)params[TF_PARAMS * (size_t)blockIdx.x + 4];
    float top = __int_as_float(0x7fc00000);   // NaN: fmaxf keeps the other operand
    for (int i = threadIdx.x; i < vocab; i += TF_THREADS) top = fmaxf(top, row[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(FULL, top, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_top[warp] = top;
    __syncthreads();
    top = lane < TF_WARPS ? warp_top[lane] : __int_as_float(0x7fc00000);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(FULL, top, o));
    for (int i = threadIdx.x; i < vocab; i += TF_THREADS) w[i] = expf((row[i] - top) / temperature);
}

extern "C" __global__ void __launch_bounds__(TF_THREADS) top_filter_draw(
    const float* __restrict__ weights, int vocab, int shift, const double* __restrict__ params,
    long long* __restrict__ out)
{
    const float* row = weights + (size_t)blockIdx.x * vocab;
    const double* p = params + TF_PARAMS * (size_t)blockIdx.x;
    const i64 top_k = (i64)p[0];
    const double top_p = p[1], uniform = p[3];
    const float min_p = (float)p[2];
    const double scale = ldexp(1.0, shift);
    const Cut all = {0u, vocab - 1};

    Cut k_cut = all;
    if (top_k > 0 && top_k < vocab) {
        const Selected s = radix_select<false>(row, vocab, scale, all, top_k);
        k_cut = {s.key, find_nth(row, vocab, Ties{s.key}, top_k - s.above)};
    }
    Cut p_cut = all;
    if (top_p < 1.0) {
        i64 mass = 0;
        for (int i = threadIdx.x; i < vocab; i += TF_THREADS) {
            const float w = row[i];
            if (k_cut.has(i, key_of(w))) mass += mass_of(w, scale);
        }
        const i64 total = block_sum(mass);
        if (total > 0) {
            // the ranked ids whose mass above is below top_p * total: all above the key where the
            // running mass reaches ceil(top_p * total), and the first `keep` of its ties
            const i64 target = min((i64)ceil(top_p * (double)total), total);   // (double) may round up
            const Selected s = radix_select<true>(row, vocab, scale, k_cut, target);
            const i64 tie = mass_of(__uint_as_float(s.key), scale);
            int last = vocab - 1;
            if (tie > 0) {
                const i64 keep = min(s.equal / tie, (target - s.above + tie - 1) / tie);
                last = find_nth(row, vocab, Ties{s.key}, keep);
            }
            p_cut = {s.key, last};
        }
    }
    const Kept kept = {k_cut, p_cut, min_p > 0.0f ? min_p : 0.0f, scale};
    i64 mass = 0;
    for (int i = threadIdx.x; i < vocab; i += TF_THREADS) mass += kept(i, row[i]);
    const i64 total = block_sum(mass);
    int id;
    if (total > 0) {
        const i64 target = min(max((i64)ceil((1.0 - uniform) * (double)total), (i64)1), total);
        id = find_nth(row, vocab, kept, target);
    } else {   // nothing has weight: the top-ranked id (the first of the largest weight)
        unsigned top = 0;
        for (int i = threadIdx.x; i < vocab; i += TF_THREADS) top = max(top, key_of(row[i]));
        __shared__ unsigned warp_top[TF_WARPS];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) top = max(top, __shfl_xor_sync(FULL, top, o));
        if (lane == 0) warp_top[warp] = top;
        __syncthreads();
        top = lane < TF_WARPS ? warp_top[lane] : 0u;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) top = max(top, __shfl_xor_sync(FULL, top, o));
        id = find_nth(row, vocab, Ties{top}, 1);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = id;
}
