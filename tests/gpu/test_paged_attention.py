"""paged_attention.cu against its NumPy mirror, on random caches with shuffled block tables, outputs
poisoned first."""
from __future__ import annotations

import numpy as np
import pytest

from common.dtypes import DTYPES
from neuron.kernels.paged_attention import PagedAttentionCuda, num_splits, paged_decode_attention_numpy

pytestmark = pytest.mark.gpu

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("d,group,kv_heads", [(64, 4, 8), (128, 4, 8), (128, 7, 4), (128, 1, 2), (256, 2, 2)])
@pytest.mark.parametrize("window", [0, 100])
def test_kernel_matches_mirror(dtype_name, d, group, kv_heads, window):
    import cupy as cp
    rng = np.random.default_rng(d + group + window)
    dt = DTYPES[dtype_name]
    block_size, num_blocks, batch = 16, 160, 5
    lens = np.array([1, 17, 255, 256, 700], dtype=np.int32)
    max_blocks = 48
    tables = np.resize(rng.permutation(num_blocks).astype(np.int32), (batch, max_blocks))
    k = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(dt)
    v = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(dt)
    q = rng.standard_normal((batch, kv_heads * group, d)).astype(dt)
    scale = d ** -0.5
    splits = num_splits(int(lens.max()))
    want = paged_decode_attention_numpy(q, k, v, tables, lens, scale, window, splits=splits)
    kernel = PagedAttentionCuda(dtype_name, d, group)
    out = cp.full(q.shape, np.nan, dtype=dt)
    got = kernel.decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(tables), cp.asarray(lens),
                        scale, window, splits, out=out).get().astype(np.float32)
    want = want.astype(np.float32)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOL[dtype_name]
