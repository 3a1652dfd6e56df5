
// compile-time: ATT_G (query heads per kv head), ATT_D (head_dim), ATT_C (keys per split), ATT_NT (threads),
// ATT_JL (key lanes)
#define G ATT_G
#define D ATT_D
#define C ATT_C
#define NT ATT_NT
#define JL ATT_JL
// q.k takes one thread per key, reading the key row from shared memory in 16-byte pieces (rows
// padded by 16 bytes, so the reads of a quarter warp hit distinct banks); no warp shuffles. (A
// first version used a warp per key with shuffle reductions: 13.2 us per layer at context 300 on
// the 8B shape, against 6.0 us for this one.)
#define KP (D + 8)
extern "C" __global__ void __launch_bounds__(NT) attn_split(const T* __restrict__ q, const T* __restrict__ kc,
        const T* __restrict__ vc, const int* __restrict__ meta, float* __restrict__ po, float* __restrict__ pm,
        float* __restrict__ pl, int Hkv, int maxc, int window, float scale) {
    __shared__ __align__(16) T Ks[C * KP];
    __shared__ __align__(16) T Vs[C * D];
    __shared__ float qs[G * D];
    __shared__ float ps[G * C];
    __shared__ float red[NT * G];
    const int s = blockIdx.x, h = blockIdx.y, NS = gridDim.x, tid = threadIdx.x;
    const int pos = meta[0], slot = meta[1];
    const int first = window > 0 ? max(0, pos - window + 1) : 0;
    const int lo = max(s * C, first);
    const int hi = min(s * C + C, pos + 1);
    const bool whole = lo == first && hi == pos + 1;
    if (lo >= hi) {
        for (int g = tid; g < G; g += NT) { pm[(h * G + g) * NS + s] = -INFINITY; pl[(h * G + g) * NS + s] = 0.f; }
        return;
    }
    const int n = hi - lo;
    const size_t base = (((size_t)slot * Hkv + h) * maxc + lo) * D;
    const uint4* ksrc = reinterpret_cast<const uint4*>(kc + base);
    const uint4* vsrc = reinterpret_cast<const uint4*>(vc + base);
    uint4* kdst = reinterpret_cast<uint4*>(Ks);
    uint4* vdst = reinterpret_cast<uint4*>(Vs);
    constexpr int RV = D / VEC, RVP = KP / VEC;   // 16-byte vectors per key row, unpadded / padded
    const int nvec = n * RV;
    for (int i = tid; i < nvec; i += NT) {
        const int j = i / RV, v = i - j * RV;
        cp_async16(kdst + j * RVP + v, ksrc + i);
        cp_async16(vdst + i, vsrc + i);
    }
    for (int i = tid; i < G * D; i += NT) qs[i] = tf(q[(size_t)h * G * D + i]);
    cp_async_wait_all();
    __syncthreads();
    for (int j = tid; j < n; j += NT) {
        float acc[G];
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g] = 0.f;
#pragma unroll 4
        for (int v = 0; v < RV; ++v) {
            float kf[VEC];
            unpack16(kdst[j * RVP + v], kf);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
#pragma unroll
                for (int g = 0; g < G; ++g) acc[g] = fmaf(qs[g * D + v * VEC + e], kf[e], acc[g]);
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g) ps[g * C + j] = tf(ft(acc[g])) * scale;
    }
    __syncthreads();
    const int lane = tid & 31, warp = tid >> 5, NW = NT / 32;
    for (int g = warp; g < G; g += NW) {
        float m = -INFINITY;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, ps[g * C + j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float p = expf(ps[g * C + j] - m);
            ps[g * C + j] = p;
            l += p;
        }
        l = warp_sum(l);
        if (whole) {
            for (int j = lane; j < n; j += 32) ps[g * C + j] = tf(ft(ps[g * C + j] / l));
        }
        if (lane == 0) { pm[(h * G + g) * NS + s] = m; pl[(h * G + g) * NS + s] = whole ? 1.f : l; }
    }
    __syncthreads();
    const int e = tid % D, jl = tid / D;
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.f;
    if (jl < JL) {
        for (int j = jl; j < n; j += JL) {
            const float v = tf(Vs[j * D + e]);
#pragma unroll
            for (int g = 0; g < G; ++g) acc[g] = fmaf(ps[g * C + j], v, acc[g]);
        }
    }
    if (JL == 1) {
#pragma unroll
        for (int g = 0; g < G; ++g) po[((size_t)(h * G + g) * NS + s) * D + e] = acc[g];
    } else {
        if (jl < JL) {
#pragma unroll
            for (int g = 0; g < G; ++g) red[(jl * G + g) * D + e] = acc[g];
        }
        __syncthreads();
        if (jl == 0) {
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float r = 0.f;
                for (int l2 = 0; l2 < JL; ++l2) r += red[(l2 * G + g) * D + e];
                po[((size_t)(h * G + g) * NS + s) * D + e] = r;
            }
        }
    }
}

// grid Hq, block NT, dynamic shared memory NS floats: out[j, :] = sum_s w_s acc_s / sum_s w_s l_s,
// w_s = exp(m_s - M) over the non-empty splits (l_s > 0). Only splits that can hold keys for this
// position are read; the per-split weights are computed once, in parallel, into shared memory.
extern "C" __global__ void __launch_bounds__(NT) attn_combine(const float* __restrict__ po,
        const float* __restrict__ pm, const float* __restrict__ pl, T* __restrict__ out,
        const int* __restrict__ meta, int NS) {
    extern __shared__ float wts[];
    __shared__ float scratch[32];
    const int j = blockIdx.x, tid = threadIdx.x;
    const int active = min(NS, meta[0] / C + 1);
    float M = -INFINITY;
    for (int s = tid; s < active; s += NT) if (pl[j * NS + s] > 0.f) M = fmaxf(M, pm[j * NS + s]);
    M = block_max(M, scratch);
    float den = 0.f;
    for (int s = tid; s < active; s += NT) {
        const float l = pl[j * NS + s];
        const float w = l > 0.f ? expf(pm[j * NS + s] - M) : 0.f;
        wts[s] = w;
        den = fmaf(w, l, den);
    }
    den = block_sum(den, scratch);   // its barriers also publish wts
    if (tid < D) {
        const float* src = po + (size_t)j * NS * D + tid;
        float num = 0.f;
#pragma unroll 4
        for (int s = 0; s < active; ++s) {
            const float w = wts[s];
            const float v = src[(size_t)s * D];
            num += w > 0.f ? w * v : 0.f;
        }
        out[(size_t)j * D + tid] = ft(num / den);
    }
}
