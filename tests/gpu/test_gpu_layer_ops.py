"""The fused layer ops (layer_ops.cu, cuBLAS by ctypes, the one-row GEMV layer) against the plain ops
they replace, on CuPy arrays; and a CUDA graph of them replays what they compute eagerly."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

from neuron.layers.ops import CudaLayerOps, HeadLayout, LayerOps  # noqa: E402

DTYPES = ["bfloat16", "float32"]


def dtype_of(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.bfloat16
    return np.float32


def rand(rng, shape, dtype_name, scale=1.0):
    return cp.asarray((rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype_of(dtype_name)))


def tables(max_positions=64, d=64):
    angles = np.outer(np.arange(max_positions), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    angles = np.concatenate([angles, angles], axis=-1)
    return cp.asarray(np.cos(angles).astype(np.float32)), cp.asarray(np.sin(angles).astype(np.float32))


def ops_pair(dtype_name, gemv=None, d=64):
    cos, sin = tables(d=d)
    return LayerOps(cp, cos, sin), CudaLayerOps(cp, cos, sin, dtype_name, one_row_gemv=gemv)


def as_f32(a):
    return cp.asnumpy(a.astype(cp.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h", [4096, 2052, 64])   # 2052: not whole vectors, the scalar kernel
def test_add_rms_norm_matches_plain(dtype, h):
    rng = np.random.default_rng(0)
    plain, fused = ops_pair(dtype)
    x, delta, w = rand(rng, (37, h), dtype), rand(rng, (37, h), dtype), rand(rng, (h,), dtype)
    x_ref, h_ref = plain.add_rms_norm(x.copy(), delta, w, 1e-5)
    x_new, h_new = fused.add_rms_norm(x.copy(), delta, w, 1e-5)
    assert np.array_equal(as_f32(x_new), as_f32(x_ref))  # the residual add rounds alike
    # the sum of squares is taken in another order: a float32 root a unit of the last place apart
    # changes most float32 outputs by that unit, and a few bfloat16 ones where it crosses a rounding
    tolerance = 1e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(as_f32(h_new), as_f32(h_ref), rtol=tolerance, atol=tolerance)
    if dtype == "bfloat16":
        assert np.mean(as_f32(h_new) == as_f32(h_ref)) > 0.99
    np.testing.assert_allclose(as_f32(fused.rms_norm(x, w, 1e-5)), as_f32(plain.rms_norm(x, w, 1e-5)),
                               rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1000, 1001])   # 1001: the scalar kernel
def test_silu_mul_matches_plain(dtype, inter):
    rng = np.random.default_rng(1)
    plain, fused = ops_pair(dtype)
    gate_up = rand(rng, (19, 2 * inter), dtype, 3.0)
    assert np.array_equal(as_f32(fused.silu_mul(gate_up)), as_f32(plain.silu_mul(gate_up)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 12])   # 12: not whole groups of four pairs, the scalar kernel
def test_rope_write_kv_matches_plain(dtype, d):
    rng = np.random.default_rng(2)
    plain, fused = ops_pair(dtype, d=d)
    heads = HeadLayout(8, 2, d)
    T, slots = 11, 48
    qkv = rand(rng, (T, (8 + 4) * d), dtype)
    positions = cp.asarray(rng.integers(0, 64, T).astype(np.int32))
    slot_mapping = cp.asarray(rng.permutation(slots)[:T].astype(np.int64))
    caches = [cp.zeros((slots, 2, d), dtype=qkv.dtype) for _ in range(4)]
    q_ref = plain.rope_write_kv(qkv, plain.rotary(positions), heads, caches[0], caches[1], slot_mapping)
    q_new = fused.rope_write_kv(qkv, fused.rotary(positions), heads, caches[2], caches[3], slot_mapping)
    assert np.array_equal(as_f32(q_new), as_f32(q_ref))
    assert np.array_equal(as_f32(caches[2]), as_f32(caches[0]))
    assert np.array_equal(as_f32(caches[3]), as_f32(caches[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 64, 257])
def test_cublas_linear_matches_cupy_matmul(dtype, m):
    rng = np.random.default_rng(3)
    _, fused = ops_pair(dtype)
    x, W = rand(rng, (m, 512), dtype), rand(rng, (768, 512), dtype, 0.05)
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(as_f32(fused.linear(x, W)), as_f32(x @ W.T), rtol=tolerance, atol=tolerance)


def one_row_inputs(rng, dtype, h=1024, inter=1536, vocab=4096):
    """A decode layer's weights and one row's input, then the final norm and the LM head."""
    return dict(x=rand(rng, (1, h), dtype), norm_w=rand(rng, (h,), dtype), post_w=rand(rng, (h,), dtype),
                final_w=rand(rng, (h,), dtype), qkv_w=rand(rng, (h + 512, h), dtype, 0.05),
                qkv_b=rand(rng, (h + 512,), dtype), o_w=rand(rng, (h, h), dtype, 0.05), o_b=rand(rng, (h,), dtype),
                gate_up=rand(rng, (2 * inter, h), dtype, 0.05), gate_up_b=rand(rng, (2 * inter,), dtype),
                down=rand(rng, (h, inter), dtype, 0.05), lm_head=rand(rng, (vocab, h), dtype, 0.05),
                rows=cp.zeros(1, dtype=cp.int32))


def one_row_layer(ops, w):
    """The layer's composite ops on w's row (w["x"] is not changed), the logits after it."""
    from neuron.collectives import SingleRank
    from neuron.layers.ops import Residual

    h = w["x"].shape[1]
    res, qkv = ops.norm_linear(Residual(w["x"].copy()), w["norm_w"], 1e-5, w["qkv_w"], w["qkv_b"])
    res = ops.linear_residual(res, qkv[:, :h], w["o_w"], w["o_b"], SingleRank())
    res, act = ops.norm_linear(res, w["post_w"], 1e-5, w["gate_up"], w["gate_up_b"], silu=True)
    res = ops.linear_residual(res, act, w["down"], None, SingleRank())
    logits = ops.norm_logits(res, w["final_w"], 1e-5, w["lm_head"], w["rows"])
    return [qkv, act, res.x if res.delta is None else res.x + res.delta, logits]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_gemv_layer_matches_the_batched_ops(dtype):
    """Norm into the GEMV's input, bias, silu and residual add into its output: the values the
    batched ops (norm kernel, cuBLAS, add) give, up to the order of the sums."""
    from neuron.kernels.fused_gemv import CudaOps

    _, batched = ops_pair(dtype)
    _, one_row = ops_pair(dtype, gemv=CudaOps(dtype))
    w = one_row_inputs(np.random.default_rng(4), dtype)
    expected, got = one_row_layer(batched, w), one_row_layer(one_row, w)
    tolerance = 3e-2 if dtype == "bfloat16" else 2e-5
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(as_f32(a), as_f32(b), rtol=tolerance, atol=tolerance)
        if dtype == "bfloat16":   # most values round alike; a sum in another order moves a few
            assert np.mean(as_f32(a) == as_f32(b)) > 0.8


@pytest.mark.parametrize("heads", [(8, 2, 128), (8, 2, 64)])   # the 8B's and the 1B's head_dim
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_rope_epilogue_equals_the_product_then_rope_write_kv(heads, with_bias):
    """One token's q/k/v GEMV with the rotary and the paged KV write in its epilogue: the bits of the
    GEMV's plain product followed by the rope_write_kv kernel."""
    from neuron.kernels.fused_gemv import CudaOps

    hq, hkv, d = heads
    rng = np.random.default_rng(7)
    gemv = CudaOps("bfloat16", rope_epilogue=True)
    _, fused = ops_pair("bfloat16", d=d)
    hidden, n, slots = 1024, (hq + 2 * hkv) * d, 16
    W, x, norm_w = rand(rng, (n, hidden), "bfloat16", 0.05), rand(rng, (hidden,), "bfloat16"), rand(rng, (hidden,), "bfloat16")
    bias = rand(rng, (n,), "bfloat16") if with_bias else None
    positions, slot = cp.asarray(np.array([41], np.int32)), cp.asarray(np.array([9], np.int64))
    assert gemv.can_rope(W)
    q = cp.empty((1, hq, d), dtype=W.dtype)
    k_cache, v_cache = cp.zeros((slots, hkv, d), dtype=W.dtype), cp.zeros((slots, hkv, d), dtype=W.dtype)
    gemv.gemv_rope(W, x, norm_w, 1e-5, bias, positions, fused.cos_table, fused.sin_table, slot, q, k_cache, v_cache,
                   hq, hkv, d)
    qkv = cp.empty(n, dtype=W.dtype)
    gemv.gemv(W, x, qkv, "rms", "store", norm_w=norm_w, eps=1e-5, bias=bias)
    k_ref, v_ref = cp.zeros_like(k_cache), cp.zeros_like(v_cache)
    q_ref = fused.rope_write_kv(qkv.reshape(1, -1), fused.rotary(positions), HeadLayout(hq, hkv, d), k_ref, v_ref, slot)
    for a, b in ((q, q_ref), (k_cache, k_ref), (v_cache, v_ref)):
        assert np.array_equal(as_f32(a), as_f32(b))
    assert np.count_nonzero(as_f32(k_cache[9])) > 0


@pytest.mark.parametrize("programmatic", [False, True])
def test_a_cuda_graph_of_the_one_row_gemv_layer_replays_it(programmatic):
    """Captured with programmatic launches (kernels/launch.py: each kernel may start while the one
    before runs, and waits for it in griddepcontrol.wait), the replay gives the eager bits."""
    from neuron.kernels.launch import programmatic_launches
    from neuron.kernels.fused_gemv import CudaOps

    _, one_row = ops_pair("bfloat16", gemv=CudaOps("bfloat16"))
    rng = np.random.default_rng(6)
    w = one_row_inputs(rng, "bfloat16")
    before = one_row_layer(one_row, w)   # also compiles and sets shared memory outside the capture
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cp.cuda.using_allocator(pool.malloc):
        with programmatic_launches(programmatic):
            stream.begin_capture()
            captured = one_row_layer(one_row, w)
            graph = stream.end_capture()
        w["x"][...] = rand(rng, w["x"].shape, "bfloat16")   # a new row in the same buffer
        for _ in range(3):
            graph.launch(stream)
        again = one_row_layer(one_row, w)   # eager, launched the ordinary way
        stream.synchronize()
    assert not np.array_equal(as_f32(captured[-1]), as_f32(before[-1]))   # the replay saw the new row
    for a, b in zip(captured, again):
        assert np.array_equal(as_f32(a), as_f32(b))


def test_a_cuda_graph_of_the_fused_ops_replays_them():
    """cuBLAS by ctypes inside a capture: the reason this module exists (CuPy's bindings refuse)."""
    rng = np.random.default_rng(5)
    _, fused = ops_pair("bfloat16")
    x, W, w = rand(rng, (8, 256), "bfloat16"), rand(rng, (512, 256), "bfloat16", 0.05), rand(rng, (256,), "bfloat16")
    pool = cp.cuda.MemoryPool()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream, cp.cuda.using_allocator(pool.malloc):
        def body():
            return fused.silu_mul(fused.linear(fused.rms_norm(x, w, 1e-5), W))
        eager = body()
        stream.synchronize()
        stream.begin_capture()
        captured = body()
        graph = stream.end_capture()
        x[...] = rand(rng, (8, 256), "bfloat16")  # new inputs in the same buffer
        graph.launch(stream)
        again = body()
        stream.synchronize()
    assert not np.array_equal(as_f32(eager), as_f32(again))
    assert np.array_equal(as_f32(captured), as_f32(again))
