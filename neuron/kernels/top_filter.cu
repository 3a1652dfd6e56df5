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
//
// Every pass over a row issues TF_UNROLL loads a thread before using them: with one load at a
// time each pass waited ~125 dependent load latencies (0.9 ms for one row's top-p draw).
#define TF_WARPS (TF_THREADS / 32)
#define TF_UNROLL 8
#define FULL 0xffffffffu
static_assert(TF_WARPS == 32, "find_nth splits a range among 32 warps and picks one with one warp");

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

// fn(i, row[i]) for i = begin, begin + step, ... < end
template <class F>
__device__ __forceinline__ void for_ids(const float* __restrict__ row, int begin, int end, int step, F fn) {
    for (int base = begin; base < end; base += step * TF_UNROLL) {
        float v[TF_UNROLL];
#pragma unroll
        for (int u = 0; u < TF_UNROLL; ++u) {
            const int i = base + u * step;
            v[u] = i < end ? row[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < TF_UNROLL; ++u) {
            const int i = base + u * step;
            if (i < end) fn(i, v[u]);
        }
    }
}

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
// The range holding the target narrows by 32 a round (each warp sums a 32nd of it, warp 0 finds the
// part where the target falls: 128k ids take two rounds) until one warp scans the last <= 32 ids.
template <class Value>
__device__ int find_nth(const float* __restrict__ row, int vocab, Value value, i64 target) {
    __shared__ i64 warp_total[TF_WARPS], next_base;
    __shared__ int next_lo, next_hi, found;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int lo = 0, hi = vocab;
    i64 base = 0;   // the running value before lo
    __syncthreads();   // the last call's readers of `found` are done
    while (hi - lo > 32) {
        const int span = ((hi - lo + TF_WARPS - 1) / TF_WARPS + 31) / 32 * 32;
        const int begin = min(hi, lo + warp * span), end = min(hi, begin + span);
        i64 s = 0;
        for_ids(row, begin + lane, end, 32, [&](int i, float w) { s += value(i, w); });
        s = warp_sum(s);
        __syncthreads();   // the last round's reads of the shared values are done
        if (lane == 0) warp_total[warp] = s;
        __syncthreads();
        if (warp == 0) {
            const i64 t = warp_total[lane];
            const i64 inclusive = base + warp_inclusive(t, lane);
            const unsigned here = __ballot_sync(FULL, inclusive - t < target && inclusive >= target);
            if (here == 0) {   // beyond the total: the last id (the final scan starts at its target)
                if (lane == 0) { next_lo = vocab - 1; next_hi = vocab; next_base = target; }
            } else if (lane == __ffs(here) - 1) {
                next_lo = min(hi, lo + lane * span);
                next_hi = min(hi, next_lo + span);
                next_base = inclusive - t;
            }
        }
        __syncthreads();
        lo = next_lo, hi = next_hi, base = next_base;
    }
    if (warp == 0) {
        const int i = lo + lane;
        const i64 inclusive = base + warp_inclusive(i < hi ? value(i, row[i]) : 0, lane);
        const unsigned hit = __ballot_sync(FULL, inclusive >= target);
        if (lane == 0) found = hit ? lo + __ffs(hit) - 1 : vocab - 1;
    }
    __syncthreads();
    return found;
}

// hist[bin] += v from every lane of a converged warp, one atomic add per distinct bin: the lanes of
// a bin sum their values by shuffles first (a row's weights crowd into a few bins of the top
// byte, and same-address atomics from one warp go one at a time)
__device__ __forceinline__ void add_to_bin(i64* hist, unsigned bin, i64 v) {
    const unsigned peers = __match_any_sync(FULL, v ? bin : 256u);
    if (v == 0) return;
    i64 sum = 0;
    for (unsigned m = peers; m; m &= m - 1) sum += __shfl_sync(peers, v, __ffs(m) - 1);
    if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(reinterpret_cast<u64*>(&hist[bin]), (u64)sum);
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
        const int lane = threadIdx.x & 31;
        for (int base = threadIdx.x - lane; base < vocab; base += TF_THREADS * TF_UNROLL) {   // warp-uniform
            float w[TF_UNROLL];
#pragma unroll
            for (int u = 0; u < TF_UNROLL; ++u) {
                const int i = base + lane + u * TF_THREADS;
                w[u] = i < vocab ? row[i] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < TF_UNROLL; ++u) {
                const int i = base + lane + u * TF_THREADS;
                const unsigned key = key_of(w[u]);
                const bool in = i < vocab && (key & high) == prefix && range.has(i, key);
                add_to_bin(hist, (key >> shift) & 255, in ? (MASS ? mass_of(w[u], scale) : 1) : 0);
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
    for_ids(row, threadIdx.x, vocab, TF_THREADS, [&](int, float x) { top = fmaxf(top, x); });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(FULL, top, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_top[warp] = top;
    __syncthreads();
    top = lane < TF_WARPS ? warp_top[lane] : __int_as_float(0x7fc00000);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(FULL, top, o));
    for_ids(row, threadIdx.x, vocab, TF_THREADS, [&](int i, float x) { w[i] = expf((x - top) / temperature); });
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
        for_ids(row, threadIdx.x, vocab, TF_THREADS, [&](int i, float w) {
            if (k_cut.has(i, key_of(w))) mass += mass_of(w, scale);
        });
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
    for_ids(row, threadIdx.x, vocab, TF_THREADS, [&](int i, float w) { mass += kept(i, w); });
    const i64 total = block_sum(mass);
    int id;
    if (total > 0) {
        const i64 target = min(max((i64)ceil((1.0 - uniform) * (double)total), (i64)1), total);
        id = find_nth(row, vocab, kept, target);
    } else {   // nothing has weight: the top-ranked id (the first of the largest weight)
        unsigned top = 0;
        for_ids(row, threadIdx.x, vocab, TF_THREADS, [&](int, float w) { top = max(top, key_of(w)); });
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
