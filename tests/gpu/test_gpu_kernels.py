"""Each CUDA kernel of neuron/kernels/fused_gemv.py (fused_base.cuh, fused_gemv.cu,
slot_attention.cu) against its NumPy mirror, on fresh random inputs, with outputs poisoned first
(an element the kernel should write but does not shows up as NaN)."""
from __future__ import annotations

import numpy as np
import pytest

from common.dtypes import DTYPES

pytestmark = pytest.mark.gpu

# relative L2 error allowed between kernel and mirror: float32 accumulation order only, plus (for
# half types) the occasional value that rounds to the neighbouring half-precision number.
TOL = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1.5e-3}


@pytest.fixture(scope="module")
def cp():
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        yield cupy


def ops_pair(dtype_name, **kw):
    from neuron.kernels.fused_gemv import CudaOps, NumpyOps
    return CudaOps(dtype_name, **kw), NumpyOps(dtype_name)


def rnd(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.isfinite(a).all(), "kernel output has NaN/inf (unwritten or overflow)"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def poison(cp, shape, dtype):
    return cp.full(shape, np.nan, dtype=np.float32).astype(dtype)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("pro", ["none", "rms", "silu", "resid_rms"])
@pytest.mark.parametrize("epi", ["store", "resid", "logits", "silu_pair", "partial"])
@pytest.mark.parametrize("shape", [(200, 64), (38, 4096), (300, 14336)])
@pytest.mark.parametrize("rows_per_warp", [1, 2])
@pytest.mark.parametrize("variant", ["default", "persistent"])
@pytest.mark.parametrize("kernel", ["bulk", "registers"])
def test_gemv(cp, dtype_name, pro, epi, shape, rows_per_warp, variant, kernel):
    """variant "default": the launch the model makes (at most one wave of blocks); "persistent": 3
    blocks, so every warp loops over several units (or has none); with kernel "bulk" each block's
    ring of slots then wraps many times. kernel: weights through bulk copies into shared memory
    (sm_90; where the slots do not fit, the plan falls back to registers) or through registers."""
    if epi == "silu_pair" and pro == "silu":
        pytest.skip("no such combination in the model")
    if rows_per_warp == 2 and (epi == "silu_pair" or pro == "silu"):
        pytest.skip("two rows per warp: only for the plain row-wise GEMVs")
    if epi == "partial" and pro != "none":
        pytest.skip("a TP rank's row-parallel partial (o, down) has no prologue")
    if pro == "resid_rms" and epi in ("resid", "partial"):
        pytest.skip("no such combination in the model")
    if kernel == "bulk" and int(cp.cuda.Device().compute_capability) < 90:
        pytest.skip("the bulk-copy GEMV: sm_90 and later")
    dt = DTYPES[dtype_name]
    cu, ref = ops_pair(dtype_name, bulk={"bulk": "always", "registers": "never"}[kernel])
    rng = np.random.default_rng(hash((dtype_name, pro, epi, shape, variant)) % 2**32)
    how = {"default": {}, "persistent": dict(blocks=3)}[variant]
    n, k = shape
    f32_out = epi in ("logits", "partial")
    for bias_on in ((False,) if f32_out else (False, True)):
        W = rnd(rng, (n, k), dt, 0.05)
        xin = rnd(rng, (2 * k if pro == "silu" else k,), dt)
        norm_w = rnd(rng, (k,), dt, 0.3) if pro in ("rms", "resid_rms") else None
        bias = rnd(rng, (n,), dt) if bias_on else None
        resid = rnd(rng, (n,), dt)
        n_out = n // 2 if epi == "silu_pair" else n
        out_h = resid.copy() if epi == "resid" else np.zeros(n_out, dt)
        outf_h = np.zeros(n, np.float32)
        extra_h, extra_d = {}, {}
        if pro == "resid_rms":
            s32, rbias = rnd(rng, (k,), np.float32), (rnd(rng, (k,), dt) if bias_on else None)
            extra_h = dict(resid=s32, resid_bias=rbias, xout=np.zeros(k, dt))
            extra_d = dict(resid=cp.asarray(s32), resid_bias=None if rbias is None else cp.asarray(rbias),
                           xout=poison(cp, k, dt))
        ref.gemv(W, xin, out_h, pro, epi, norm_w=norm_w, eps=1e-5, bias=bias, outf=outf_h, **extra_h)
        out_d = cp.asarray(resid) if epi == "resid" else poison(cp, n_out, dt)
        outf_d = cp.full(n, np.nan, dtype=np.float32)
        cu.gemv(cp.asarray(W), cp.asarray(xin), None if f32_out else out_d, pro, epi,
                norm_w=None if norm_w is None else cp.asarray(norm_w), eps=1e-5,
                bias=None if bias is None else cp.asarray(bias), outf=outf_d if f32_out else None,
                rows_per_warp=rows_per_warp, **extra_d, **how)
        if pro == "resid_rms":  # the new residual, stored by block 0: elementwise, bit-exact
            assert np.array_equal(extra_d["xout"].get().view(np.uint8), extra_h["xout"].view(np.uint8))
        got, want = (outf_d.get(), outf_h) if f32_out else (out_d.get(), out_h)
        tol = 1e-5 if epi == "partial" else TOL[dtype_name]  # float32 out: summation order only
        assert rel(got, want) < tol, (dtype_name, pro, epi, shape, bias_on, variant)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("tn,bias_on,qkn", [(1, False, False), (1, True, False), (7, False, True), (5, True, True)])
def test_qkv_post(cp, dtype_name, tn, bias_on, qkn):
    from neuron.model.rope import cos_sin_tables
    from neuron.model.config import ModelConfig
    dt = DTYPES[dtype_name]
    cu, ref = ops_pair(dtype_name)
    rng = np.random.default_rng(tn * 10 + bias_on * 2 + qkn)
    hq, hkv, d, maxc, slots = 8, 2, 64, 96, 3
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": hq * d,
                                 "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": hq,
                                 "num_key_value_heads": hkv, "rope_theta": 10000.0})
    cos, sin = cos_sin_tables(cfg, maxc)
    qkv = rnd(rng, (tn, (hq + 2 * hkv) * d), dt)
    bias = rnd(rng, ((hq + 2 * hkv) * d,), dt) if bias_on else None
    qn, kn = (rnd(rng, (d,), dt), rnd(rng, (d,), dt)) if qkn else (None, None)
    start, slot = 40, 2
    meta = np.array([start, slot, 0, 0], np.int32)
    kc = rnd(rng, (slots, hkv, maxc, d), dt)
    vc = rnd(rng, (slots, hkv, maxc, d), dt)
    q_h = np.zeros((hkv, tn, hq // hkv, d), dt)
    kc_h, vc_h = kc.copy(), vc.copy()
    ref.qkv_post(qkv, meta, tn, bias, qn, kn, cos, sin, q_h, kc_h, vc_h, hq, hkv, d, 1e-6)
    g = cp.asarray
    q_d = poison(cp, q_h.shape, dt)
    kc_d, vc_d = g(kc), g(vc)
    cu.qkv_post(g(qkv), g(meta), tn, None if bias is None else g(bias), None if qn is None else g(qn),
                None if kn is None else g(kn), g(cos), g(sin), q_d, kc_d, vc_d, hq, hkv, d, 1e-6)
    tol = TOL[dtype_name]
    assert rel(q_d.get(), q_h) < tol
    assert rel(kc_d.get(), kc_h) < tol
    assert rel(vc_d.get(), vc_h) < tol
    # nothing outside the written positions changed
    untouched = np.ones(maxc, bool)
    untouched[start:start + tn] = False
    assert np.array_equal(kc_d.get()[:, :, untouched].view(np.uint8), kc[:, :, untouched].view(np.uint8))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("g,d", [(1, 16), (4, 16), (4, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize("pos,window", [(0, 0), (5, 0), (63, 0), (64, 0), (200, 0), (511, 0), (300, 100)])
def test_attn_decode(cp, dtype_name, g, d, pos, window):
    dt = DTYPES[dtype_name]
    cu, ref = ops_pair(dtype_name)
    rng = np.random.default_rng(pos * 7 + g + d)
    hkv, maxc, slots, slot = 2, 512, 2, 1
    hq = hkv * g
    q = rnd(rng, (hkv, 1, g, d), dt)
    kc = rnd(rng, (slots, hkv, maxc, d), dt)
    vc = rnd(rng, (slots, hkv, maxc, d), dt)
    meta = np.array([pos, slot, 0, 0], np.int32)
    ns = cu.attn_splits(g, d, maxc)
    scale = 1.0 / d ** 0.5
    po, pm, pl = (np.zeros((hq, ns, d), np.float32), np.zeros((hq, ns), np.float32), np.zeros((hq, ns), np.float32))
    out_h = np.zeros(hq * d, dt)
    ref.attn_decode(q, kc, vc, meta, window, scale, po, pm, pl, out_h, hq, hkv, d)
    out_d = poison(cp, hq * d, dt)
    gpo, gpm, gpl = cp.zeros((hq, ns, d), np.float32), cp.zeros((hq, ns), np.float32), cp.zeros((hq, ns), np.float32)
    cu.attn_decode(cp.asarray(q), cp.asarray(kc), cp.asarray(vc), cp.asarray(meta), window, scale, gpo, gpm, gpl,
                   out_d, hq, hkv, d)
    assert rel(out_d.get(), out_h) < TOL[dtype_name]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("start,tn,window", [(0, 9, 0), (30, 17, 0), (0, 40, 8)])
def test_prefill_attention_pieces(cp, dtype_name, start, tn, window):
    dt = DTYPES[dtype_name]
    cu, ref = ops_pair(dtype_name)
    rng = np.random.default_rng(start + tn)
    hkv, g, d, maxc, slots, slot = 2, 3, 32, 64, 2, 1
    q = rnd(rng, (hkv, tn, g, d), dt)
    kc = rnd(rng, (slots, hkv, maxc, d), dt)
    vc = rnd(rng, (slots, hkv, maxc, d), dt)
    meta = np.array([start, slot, 0, 0], np.int32)
    t0, c = 2, tn - 2
    lc = start + t0 + c
    S_h = np.zeros((hkv, c * g, lc), dt)
    ref.attn_scores(q, kc, slot, t0, c, lc, S_h)
    S_d = poison(cp, S_h.shape, dt)
    cu.attn_scores(cp.asarray(q), cp.asarray(kc), slot, t0, c, lc, S_d)
    assert rel(S_d.get(), S_h) < TOL[dtype_name]
    S_d = cp.asarray(S_h)  # identical inputs for the next stage
    ref.softmax_rows(S_h, meta, t0, g, window, 1.0 / d ** 0.5)
    cu.softmax_rows(S_d, cp.asarray(meta), t0, g, window, 1.0 / d ** 0.5)
    assert rel(S_d.get(), S_h) < TOL[dtype_name]
    S_d = cp.asarray(S_h)
    O_h = np.zeros((hkv, c * g, d), dt)
    ref.attn_pv(S_h, vc, slot, O_h)
    O_d = poison(cp, O_h.shape, dt)
    cu.attn_pv(S_d, cp.asarray(vc), slot, O_d)
    assert rel(O_d.get(), O_h) < TOL[dtype_name]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_rows_kernels(cp, dtype_name):
    dt = DTYPES[dtype_name]
    cu, ref = ops_pair(dtype_name)
    rng = np.random.default_rng(3)
    rows, hid, inter = 5, 4096, 1000
    x, delta, w = rnd(rng, (rows, hid), dt), rnd(rng, (rows, hid), dt), rnd(rng, (hid,), dt)
    for with_delta in (False, True):
        xh, hh = x.copy(), np.zeros_like(x)
        ref.add_rmsnorm(xh, delta if with_delta else None, w, 1e-5, hh)
        xd, hd = cp.asarray(x), poison(cp, x.shape, dt)
        cu.add_rmsnorm(xd, cp.asarray(delta) if with_delta else None, cp.asarray(w), 1e-5, hd)
        assert rel(xd.get(), xh) < TOL[dtype_name] and rel(hd.get(), hh) < TOL[dtype_name]
    s32 = rnd(rng, (rows, hid), np.float32)
    bias = rnd(rng, (hid,), dt)
    for with_bias in (False, True):
        for with_norm in (False, True):
            xh, hh = x.copy(), np.zeros_like(x)
            ref.resid_add_f32(xh, s32, bias if with_bias else None, w, 1e-5, hh if with_norm else None)
            xd, hd = cp.asarray(x), poison(cp, x.shape, dt)
            cu.resid_add_f32(xd, cp.asarray(s32), cp.asarray(bias) if with_bias else None, cp.asarray(w), 1e-5,
                             hd if with_norm else None)
            assert np.array_equal(xd.get().view(np.uint8), xh.view(np.uint8))  # elementwise: bit-exact
            if with_norm:
                assert rel(hd.get(), hh) < TOL[dtype_name]
    xd = cp.asarray(x[0])  # one row (decode): x [H]
    xh = x[0].copy()
    ref.resid_add_f32(xh, s32[0], None)
    cu.resid_add_f32(xd, cp.asarray(s32[0]), None)
    assert np.array_equal(xd.get().view(np.uint8), xh.view(np.uint8))
    a, W = rnd(rng, (7, 512), dt), rnd(rng, (300, 512), dt, 0.05)
    got = cu.linear_f32(cp.asarray(a), cp.asarray(W)).get()
    assert got.dtype == np.float32 and rel(got, ref.linear_f32(a, W)) < 1e-5
    gu = rnd(rng, (rows, 2 * inter), dt, 3.0)
    oh = np.zeros((rows, inter), dt)
    ref.silu_mul(gu, oh)
    od = poison(cp, (rows, inter), dt)
    cu.silu_mul(cp.asarray(gu), od)
    assert rel(od.get(), oh) < TOL[dtype_name]
    table = rnd(rng, (50, hid), dt)
    tokens = cp.asarray(np.array([11, 12, 13], np.int32))
    for meta, want in (([0, 1, 37, 0], 37), ([5, 2, -1, 0], 13)):  # host token; chained: tokens[slot]
        xd = poison(cp, hid, dt)
        cu.embed_row(cp.asarray(table), cp.asarray(np.array(meta, np.int32)), tokens, xd)
        assert np.array_equal(xd.get().view(np.uint8), table[want].view(np.uint8))


def test_argmax_first_of_ties(cp):
    from neuron.kernels.fused_gemv import CudaOps
    cu = CudaOps("float32")
    rng = np.random.default_rng(5)
    for n in (1, 450, 128256):
        x = rng.standard_normal(n).astype(np.float32)
        if n > 10:
            x[[7, n - 3]] = x.max() + 1.0  # a tie: the first index wins, like numpy.argmax
        out = cp.full(1, -1, dtype=np.int32)
        cu.argmax(cp.asarray(x), out)
        assert int(out.get()[0]) == int(np.argmax(x))
        per_slot = cp.full(4, -1, dtype=np.int32)
        cu.argmax(cp.asarray(x), per_slot, cp.asarray(np.array([0, 2, 0, 0], np.int32)))
        assert per_slot.get().tolist() == [-1, -1, int(np.argmax(x)), -1]
