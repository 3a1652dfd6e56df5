// Paged attention on tensor cores: tiles of up to 16 query rows of one sequence against its KV blocks
// (GQA, split-K), for 16-bit caches. Decode rows are tiles of one row; a prompt chunk's consecutive
// rows share tiles, so its keys are read once per 16 rows instead of once per row.
//
// Same layouts as paged_attention.cu: the cache is [num_blocks, block_size, kv_heads, head_dim];
// row r attends to positions 0 .. context_lens[r] - 1 of the blocks in block_tables[r].
//
// Pass 1 (paged_tile_partial), grid (tiles, kv_heads * head_chunks, up to splits): one block takes one
// tile, one kv head (up to PA_W of its query heads, one warp each) and the keys of one split (of
// splits z, z + gridDim.z, ... in turn when the grid is narrower than the splits). It
// walks the split PA_KT keys at a time (K and V staged in shared memory once for all its warps, the
// next tile copied in by cp.async while this one is used): S = Q K^T by mma.m16n8k16,
// an online softmax in float32, then P @ V by mma with P as two 16-bit parts. It writes each row's unnormalised output and (max, sum) in base 2.
// Pass 2 (paged_row_combine), grid (rows * q_heads): the row's own splits, splits_for(context),
// rescaled to their common max and normalised.
//
// Why a row's result does not depend on its tile-mates, its chunk boundaries or the batch: every
// row's scores, maxima and sums come from its own mma row (the tensor core never mixes rows), the
// key tiles sit at fixed multiples of PA_KT inside fixed splits, and keys a row may not see get
// probability exactly 0 (a tile with none of its keys changes neither its max, nor its sum, nor its
// output). Tile-mates only decide where a CTA stops reading keys.
//
// Decode rows (PA_PACK=1, per_row, one warp a block; a candidate, not yet on by default): the 16 mma rows of the warp are the group's
// query heads of the one row (head h of the group is mma row h) instead of 16 positions of one head,
// so the group reads each staged key once instead of once per warp and the tensor cores do 1/PA_G of
// the work. Each (position, head) pair is still one mma row with its own position's mask, the same
// key tiles and splits, and the same per-row reductions, so it gets the bits the tiled kernel
// gives it.
//
// Compile-time: DT (0 bf16, 1 f16), PA_D head_dim (multiple of 16), PA_G query heads per kv head,
// PA_W warps per block (<= PA_G; 1 with PA_PACK), PA_KT keys per shared tile, PA_SPLIT keys per split
// and PA_FINE keys per split over the first PA_SPLIT keys (both multiples of PA_KT), PA_PACK (0: rows
// are positions of one head, 1: rows are the heads of one row).
#include "dtype.cuh"

#ifndef PA_PACK
#define PA_PACK 0
#endif
#define PA_ROWS 16
#define PA_THREADS (32 * PA_W)
#define PA_CHUNKS ((PA_G + PA_W - 1) / PA_W)
#ifndef PA_FINE
#define PA_FINE PA_SPLIT
#endif
#define PA_FINE_SPLITS (PA_SPLIT / PA_FINE)
static_assert(PA_SPLIT % PA_FINE == 0 && PA_FINE % PA_KT == 0, "fine splits tile the first split");

// The splits are fixed key ranges whatever the batch: PA_FINE keys each over keys 0 .. PA_SPLIT - 1,
// then PA_SPLIT each. The fine ones give a short context several blocks (one stream's decode had
// 8 blocks for the 8B's 8 kv heads, each walking 256 keys alone), the coarse ones keep the partials
// of long contexts few.
__device__ __forceinline__ int split_first(int s) {
    return s < PA_FINE_SPLITS ? s * PA_FINE : (s - PA_FINE_SPLITS + 1) * PA_SPLIT;
}
__device__ __forceinline__ int split_size(int s) { return s < PA_FINE_SPLITS ? PA_FINE : PA_SPLIT; }
__device__ __forceinline__ int splits_for(int context) {
    return context <= PA_SPLIT ? (context + PA_FINE - 1) / PA_FINE
                               : PA_FINE_SPLITS - 1 + (context + PA_SPLIT - 1) / PA_SPLIT;
}

static_assert(PA_KT <= 32, "a tile's key rows are found by one lane each");
#define PA_STRIDE (PA_D + 8)   // 16-bit elements per shared row: the padding spreads a warp's fragment loads over all banks

__device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
    unsigned r;
#if DT == 0
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ unsigned shared_address(const void* smem) {
    unsigned address;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(address) : "l"(smem));
    return address;
}

// 16 bytes global -> shared without registers; `valid` false writes 16 zero bytes instead
__device__ __forceinline__ void copy16_async(void* smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(shared_address(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}

// Four 8x8 16-bit matrices from shared memory in one instruction; lane i gives the address of row
// i % 8 of matrix i / 8 (16 bytes). Lane (g, t) gets, of each matrix, (row g, columns 2t, 2t + 1):
// an mma B fragment of keys x dims. With .trans it gets (rows 2t, 2t + 1, column g): one of dims x
// keys. Either way the same values the fragments were built of one 16- or 32-bit load at a time
// (a V fragment took four 16-bit loads and two shifts), so the mma inputs and the bits are the same.
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(unsigned* r, const void* row) {   // lanes 0-15 give the rows
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(shared_address(row)) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(row)) : "memory");
}

// x0, x1 as 16-bit pairs hi + lo: hi the rounded value, lo what rounding lost, so P @ V sees about
// 16 bits of each probability (one 16-bit P cost 1e-3 of cosine on the tiny Mistral fixture)
__device__ __forceinline__ void split_pair(float x0, float x1, unsigned& hi, unsigned& lo) {
    hi = pack_pair(x0, x1);
#if DT == 0
    const float h0 = __uint_as_float(hi << 16), h1 = __uint_as_float(hi & 0xffff0000u);
#else
    float h0, h1;
    asm("{ .reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }" : "=f"(h0), "=f"(h1) : "r"(hi));
#endif
    lo = pack_pair(x0 - h0, x1 - h1);
}

// c[4] += a[4] (16x16, row) * b[2] (16x8, col), float32 accumulation
__device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b) {
#if DT == 0
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(PA_THREADS) paged_tile_partial(
    const T* __restrict__ q,              // [rows, q_heads, PA_D]
    const T* __restrict__ k_cache,
    const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, // [rows, max_blocks]
    const int* __restrict__ context_lens, // [rows]
    const int* __restrict__ tile_first,   // [tiles]: first row (ignored when per_row)
    const int* __restrict__ tile_rows,    // [tiles]: rows in the tile, consecutive positions of one sequence
    float* __restrict__ part_out,         // [rows, q_heads, splits, PA_D]
    float* __restrict__ part_ml,          // [rows, q_heads, splits, 2]
    int kv_heads, int block_size, int max_blocks, float scale_log2, int window, int per_row, int splits, int pdl)
{
    if (pdl) {   // launched programmatically (kernels/launch.py): q and this turn's keys are the running kernel's
        pdl_trigger();
        pdl_wait();
    }
    const int tile = blockIdx.x;
#if PA_PACK
    const int kvh = blockIdx.y, head_in_group = 0;
    const int first = tile, count = 1;            // one row; its heads are the mma rows
#else
    const int kvh = blockIdx.y / PA_CHUNKS, head_in_group = (blockIdx.y % PA_CHUNKS) * PA_W + (threadIdx.x >> 5);
    const int first = per_row ? tile : tile_first[tile];
    const int count = per_row ? 1 : tile_rows[tile];
#endif
    const int pos0 = context_lens[first] - 1;     // positions pos0 .. pos0 + count - 1
    if (split_first(blockIdx.z) > pos0 + count - 1) return;   // no row of the tile reads this split

    // Two stages of K and V: the next key tile is copied in (cp.async) while this one is used.
    __shared__ __align__(16) T sk[2][PA_KT][PA_STRIDE];
    __shared__ __align__(16) T sv[2][PA_KT][PA_STRIDE];

    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bool active = head_in_group < PA_G;
    const int q_heads = kv_heads * PA_G;
    const int head = kvh * PA_G + (active ? head_in_group : 0);
    const int* table = block_tables + (size_t)first * max_blocks;

    // Q as A fragments: rows g and g + 8 of the tile, dims 16 kk + 2 t (+1, +8, +9)
#if PA_PACK
    const int valid_rows = PA_G;                  // row r: head kvh * PA_G + r of row `first`
    const T* q0 = q + ((size_t)first * q_heads + kvh * PA_G + g) * PA_D + 2 * t;
    const T* q1 = q0 + (size_t)8 * PA_D;
    const int pos[2] = {pos0, pos0};
#else
    const int valid_rows = count;                 // row r: position pos0 + r of head `head`
    const T* q0 = q + ((size_t)(first + g) * q_heads + head) * PA_D + 2 * t;
    const T* q1 = q0 + (size_t)8 * q_heads * PA_D;
    const int pos[2] = {pos0 + g, pos0 + g + 8};
#endif
    unsigned qa[PA_D / 16][4];
#pragma unroll
    for (int kk = 0; kk < PA_D / 16; ++kk) {
        qa[kk][0] = g < valid_rows ? *reinterpret_cast<const unsigned*>(q0 + 16 * kk) : 0u;
        qa[kk][1] = g + 8 < valid_rows ? *reinterpret_cast<const unsigned*>(q1 + 16 * kk) : 0u;
        qa[kk][2] = g < valid_rows ? *reinterpret_cast<const unsigned*>(q0 + 16 * kk + 8) : 0u;
        qa[kk][3] = g + 8 < valid_rows ? *reinterpret_cast<const unsigned*>(q1 + 16 * kk + 8) : 0u;
    }
    // The block takes splits blockIdx.z, + gridDim.z, ...: a grid narrower than the splits of the
    // longest context (a decode graph's, sized for the shard's max_context) launches no blocks for
    // splits that short contexts never reach, and each split is computed as by a block of its own.
    for (int split = blockIdx.z; split < splits; split += gridDim.z) {
        const int split_lo = split_first(split);
        if (split_lo > pos0 + count - 1) break;        // no row of the tile reads this split, nor later ones
        const int hi = min(pos0 + count, split_lo + split_size(split));
        int lo = split_lo;
        if (window > 0) lo = max(lo, (pos0 - window + 1) / PA_KT * PA_KT);   // earlier key tiles are masked for every row
        float o[PA_D / 8][4];
#pragma unroll
        for (int n = 0; n < PA_D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

        // A tile's copies: lane l of every warp finds key row l's cache row (one block-table read and
        // one division a thread), and each copy takes its row's from that lane by shuffle. Finding the
        // row per copy put a dependent table read and a division before each of a thread's 16 copies
        // (one warp a block), which serialised the staging of the next tile.
        auto stage = [&](int buf, int k0) {
            const int j = k0 + lane;
            const int row_at = (lane < PA_KT && j < hi) ? (table[j / block_size] * block_size + j % block_size) * kv_heads + kvh : 0;
            constexpr int CHUNKS = PA_KT * (PA_D / 8);
#pragma unroll
            for (int it = 0; it < (CHUNKS + PA_THREADS - 1) / PA_THREADS; ++it) {
                const int i = it * PA_THREADS + threadIdx.x;
                const int kr = i / (PA_D / 8), c = (i % (PA_D / 8)) * 8;
                const int at_row = __shfl_sync(0xffffffffu, row_at, kr & 31);   // every lane takes part
                if (CHUNKS % PA_THREADS == 0 || i < CHUNKS) {
                    const bool valid = k0 + kr < hi;   // past hi the copy writes zeros: 0 * V stays 0
                    const size_t at = valid ? (size_t)at_row * PA_D + c : 0;
                    copy16_async(&sk[buf][kr][c], k_cache + at, valid);
                    copy16_async(&sv[buf][kr][c], v_cache + at, valid);
                }
            }
            asm volatile("cp.async.commit_group;\n" ::);
        };
        if (lo < hi) stage(0, lo);
        for (int k0 = lo, buf = 0; k0 < hi; k0 += PA_KT, buf ^= 1) {
            if (k0 + PA_KT < hi) {
                stage(buf ^ 1, k0 + PA_KT);
                asm volatile("cp.async.wait_group 1;\n" ::);
            } else {
                asm volatile("cp.async.wait_group 0;\n" ::);
            }
            __syncthreads();   // this tile is in, for every thread
            if (active) {
                // S = Q K^T: keys 8 n .. 8 n + 7 are the B columns; one ldmatrix brings two kk steps
                // (matrix j: dims 8 j .. 8 j + 7 of the 32), added in the same kk order as before
                float s[PA_KT / 8][4];
#pragma unroll
                for (int n = 0; n < PA_KT / 8; ++n) {
                    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
                    for (int kk = 0; kk + 1 < PA_D / 16; kk += 2) {
                        unsigned b[4];
                        ldmatrix_x4(b, &sk[buf][8 * n + (lane & 7)][16 * kk + 8 * (lane >> 3)]);
                        mma_16816(s[n], qa[kk], b);
                        mma_16816(s[n], qa[kk + 1], b + 2);
                    }
                    if ((PA_D / 16) % 2) {   // head_dim an odd number of 16s: the last step alone
                        unsigned b[2];
                        ldmatrix_x2(b, &sk[buf][8 * n + (lane & 7)][PA_D - 16 + 8 * ((lane >> 3) & 1)]);
                        mma_16816(s[n], qa[PA_D / 16 - 1], b);
                    }
                }
                float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int n = 0; n < PA_KT / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = k0 + 8 * n + 2 * t + (e & 1), p = pos[e >> 1];
                        const bool seen = key <= p && (window <= 0 || key > p - window);
                        s[n][e] = seen ? s[n][e] * scale_log2 : -INFINITY;
                        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
                    }
                float base[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
                    tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
                    const float m_new = fmaxf(m[r], tile_max[r]);
                    base[r] = m_new == -INFINITY ? 0.f : m_new;     // a row with no key yet: all its p are 0
                    const float alpha = exp2f(m[r] - base[r]);      // exactly 1 while the max holds
                    m[r] = m_new;
                    l[r] *= alpha;
#pragma unroll
                    for (int n = 0; n < PA_D / 8; ++n) { o[n][2 * r] *= alpha; o[n][2 * r + 1] *= alpha; }
                }
#pragma unroll
                for (int n = 0; n < PA_KT / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        s[n][e] = exp2f(s[n][e] - base[e >> 1]);
                        l[e >> 1] += s[n][e];
                    }
                // P @ V: the S accumulators of keys 16 kk .. 16 kk + 15 are already P's A fragment, as hi + lo
#pragma unroll
                for (int kk = 0; kk < PA_KT / 16; ++kk) {
                    unsigned hi[4], lo[4];
                    split_pair(s[2 * kk][0], s[2 * kk][1], hi[0], lo[0]);
                    split_pair(s[2 * kk][2], s[2 * kk][3], hi[1], lo[1]);
                    split_pair(s[2 * kk + 1][0], s[2 * kk + 1][1], hi[2], lo[2]);
                    split_pair(s[2 * kk + 1][2], s[2 * kk + 1][3], hi[3], lo[3]);
                    // V's B fragments for dims 8 n .. 8 n + 15 (two n) by one transposed ldmatrix:
                    // matrix j holds keys 16 kk + 8 (j & 1) .., dims 8 (n + (j >> 1)) ..
#pragma unroll
                    for (int n = 0; n < PA_D / 8; n += 2) {
                        unsigned b[4];
                        ldmatrix_x4_trans(b, &sv[buf][16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7)][8 * n + 8 * (lane >> 4)]);
                        mma_16816(o[n], hi, b);
                        mma_16816(o[n], lo, b);
                        mma_16816(o[n + 1], hi, b + 2);
                        mma_16816(o[n + 1], lo, b + 2);
                    }
                }
            }
            __syncthreads();   // every warp is done with this stage before it is refilled
        }
        if (active) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
                l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
                const int row = g + 8 * r;
                if (row >= valid_rows) continue;
#if PA_PACK
                const size_t at = ((size_t)first * q_heads + kvh * PA_G + row) * splits + split;
#else
                const size_t at = ((size_t)(first + row) * q_heads + head) * splits + split;
#endif
#pragma unroll
                for (int n = 0; n < PA_D / 8; ++n)
                    *reinterpret_cast<float2*>(part_out + at * PA_D + 8 * n + 2 * t) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
                if (t == 0) { part_ml[at * 2] = m[r]; part_ml[at * 2 + 1] = l[r]; }
            }
        }
    }
}

extern "C" __global__ void paged_row_combine(
    const float* __restrict__ part_out,   // [rows, q_heads, splits, PA_D]
    const float* __restrict__ part_ml,    // [rows, q_heads, splits, 2], max in base 2
    const int* __restrict__ context_lens, // [rows]
    T* __restrict__ out,                  // [rows, q_heads, PA_D]
    int q_heads, int splits, int pdl)
{
    if (pdl) {   // launched programmatically (kernels/launch.py): the partials are the running kernel's
        pdl_trigger();
        pdl_wait();
    }
    const size_t item = blockIdx.x;        // row * q_heads + head
    const int mine = splits_for(context_lens[item / q_heads]);   // the row's own splits
    const float* ml = part_ml + item * splits * 2;
    float top = -INFINITY;
    for (int s = 0; s < mine; ++s) if (ml[2 * s + 1] > 0.f) top = fmaxf(top, ml[2 * s]);
    float denom = 0.f;
    for (int s = 0; s < mine; ++s) if (ml[2 * s + 1] > 0.f) denom += ml[2 * s + 1] * exp2f(ml[2 * s] - top);
    for (int dd = threadIdx.x; dd < PA_D; dd += blockDim.x) {
        float numer = 0.f;
        for (int s = 0; s < mine; ++s)
            if (ml[2 * s + 1] > 0.f) numer += part_out[(item * splits + s) * PA_D + dd] * exp2f(ml[2 * s] - top);
        out[item * PA_D + dd] = ft(denom > 0.f ? numer / denom : 0.f);
    }
}
