"""The one-token q/k/v GEMV with the rotary embedding and the KV write in its epilogue ("rope",
kernels/fused_gemv.py), in its NumPy mirror: the same values as the product followed by the plain
rope_write_kv (tests/gpu holds the CUDA kernel to the same)."""
from __future__ import annotations

import numpy as np
import pytest

from neuron.layers.ops import HeadLayout, LayerOps
from neuron.kernels.fused_gemv import NumpyOps


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_rope_epilogue_equals_the_product_then_rope_write_kv(dtype, with_bias):
    ops = NumpyOps(dtype)
    rng = np.random.default_rng(3)
    hq, hkv, d, hidden, slots = 4, 2, 16, 48, 8
    n = (hq + 2 * hkv) * d

    def draw(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(ops.T)

    W, x, norm_w = draw(n, hidden, scale=0.2), draw(hidden), draw(hidden)
    bias = draw(n) if with_bias else None
    angles = np.outer(np.arange(64), 1.0 / 10000 ** (np.arange(0, d, 2) / d))
    cos = np.cos(np.concatenate([angles, angles], axis=1)).astype(np.float32)
    sin = np.sin(np.concatenate([angles, angles], axis=1)).astype(np.float32)
    positions, slot = np.array([37], np.int32), np.array([5], np.int64)

    q = np.empty((1, hq, d), ops.T)
    k_cache, v_cache = np.zeros((slots, hkv, d), ops.T), np.zeros((slots, hkv, d), ops.T)
    ops.gemv_rope(W, x, norm_w, 1e-5, bias, positions, cos, sin, slot, q, k_cache, v_cache, hq, hkv, d)

    qkv = np.empty(n, ops.T)
    ops.gemv(W, x, qkv, "rms", "store", norm_w=norm_w, eps=1e-5, bias=bias)
    plain = LayerOps(np, cos, sin)
    k_ref, v_ref = np.zeros_like(k_cache), np.zeros_like(v_cache)
    q_ref = plain.rope_write_kv(qkv.reshape(1, -1), plain.rotary(positions), HeadLayout(hq, hkv, d), k_ref, v_ref, slot)
    assert np.array_equal(q.astype(np.float32), q_ref.astype(np.float32))
    assert np.array_equal(k_cache.astype(np.float32), k_ref.astype(np.float32))
    assert np.array_equal(v_cache.astype(np.float32), v_ref.astype(np.float32))
    assert np.count_nonzero(k_cache[5].astype(np.float32)) > 0 and not np.any(k_cache[4].astype(np.float32))
