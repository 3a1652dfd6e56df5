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
@pytest.mark.parametrize("d,group,kv_heads", [(64, 4, 8), (80, 4, 2), (128, 4, 8), (128, 7, 4), (128, 1, 2), (256, 2, 2)])
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
    want = paged_decode_attention_numpy(q, k, v, tables, lens, scale, window, splits=num_splits(int(lens.max())))
    kernel = PagedAttentionCuda(dtype_name, d, group)
    out = cp.full(q.shape, np.nan, dtype=dt)
    got = kernel.decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(tables), cp.asarray(lens),
                        scale, window, kernel.num_splits(int(lens.max())), out=out).get().astype(np.float32)
    want = want.astype(np.float32)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOL[dtype_name]


def _paged_case(rng, dt, d, group, kv_heads, chunks, block_size=16):
    """Requests given as (start position, rows): a cache holding every request's keys up to its
    chunk's end in shuffled blocks, the chunk's query rows, and per row its table and context."""
    max_blocks = max(-(-(start + rows) // block_size) for start, rows in chunks)
    num_blocks = max_blocks * len(chunks) + 3
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = perm[: max_blocks * len(chunks)].reshape(len(chunks), max_blocks)
    k = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(dt)
    v = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(dt)
    query_start = np.concatenate([[0], np.cumsum([rows for _, rows in chunks])]).astype(np.int32)
    positions = np.concatenate([np.arange(start, start + rows) for start, rows in chunks]).astype(np.int32)
    owner = np.repeat(np.arange(len(chunks)), [rows for _, rows in chunks])
    q = rng.standard_normal((len(positions), kv_heads * group, d)).astype(dt)
    return q, k, v, query_start, np.ascontiguousarray(tables[owner]), positions + 1


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("d,group,kv_heads", [(64, 4, 8), (80, 4, 2), (128, 4, 8), (128, 7, 2), (128, 1, 2), (256, 2, 2)])
@pytest.mark.parametrize("window", [0, 100])
def test_tiled_kernel_matches_its_mirror_on_prompt_chunks(dtype_name, d, group, kv_heads, window):
    """Chunks of 1, 5, 37 and 300 rows starting at 0, 250 and 700: tiles that end inside a block,
    cross splits, and (with the window) start past the first keys."""
    import cupy as cp

    from neuron.kernels.paged_attention import paged_tile_attention_numpy, query_tiles, tile_keys
    rng = np.random.default_rng(d * group + window)
    q, k, v, query_start, tables, lens = _paged_case(rng, DTYPES[dtype_name], d, group, kv_heads,
                                                     [(700, 1), (0, 5), (250, 37), (0, 300)])
    kernel = PagedAttentionCuda(dtype_name, d, group)
    assert kernel.tiled
    splits = kernel.num_splits(int(lens.max()))
    first, count = query_tiles(query_start)
    out = cp.full(q.shape, np.nan, dtype=q.dtype)
    got = kernel.decode(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(tables), cp.asarray(lens),
                        d ** -0.5, window, splits, out=out, tiles=(cp.asarray(first), cp.asarray(count)))
    got = got.get().astype(np.float32)
    want = paged_tile_attention_numpy(q, k, v, tables, lens, d ** -0.5, window,
                                      step_keys=tile_keys(d)).astype(np.float32)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < TOL[dtype_name]
    exact = paged_decode_attention_numpy(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32),
                                         tables, lens, d ** -0.5, window)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2 * TOL[dtype_name]


@pytest.mark.parametrize("dtype_name,d,group,kv_heads", [("bfloat16", 128, 4, 8), ("bfloat16", 64, 4, 8),
                                                        ("float16", 128, 7, 2), ("bfloat16", 128, 8, 2),
                                                        ("bfloat16", 256, 2, 2), ("bfloat16", 128, 1, 2)])
def test_tiled_kernel_rows_do_not_depend_on_tiles_chunks_or_batch(dtype_name, d, group, kv_heads):
    """Batch invariance of the tensor-core kernel, bit for bit: a 600-row prompt attended as one
    chunk, as chunks cut at other places, and row by row (decode rows, with the group's heads packed
    as one warp's mma rows and without), beside other requests or alone."""
    import cupy as cp

    from neuron.kernels.paged_attention import query_tiles
    rng = np.random.default_rng(7)
    q, k, v, _, tables, lens = _paged_case(rng, DTYPES[dtype_name], d, group, kv_heads, [(0, 600)])
    kernel = PagedAttentionCuda(dtype_name, d, group)
    args = [cp.asarray(a) for a in (k, v)]
    splits = kernel.num_splits(int(lens.max())) + 1   # more splits than any row needs: they must be ignored

    def attend(rows, cuts=None):
        """rows of the prompt as chunks split at `cuts` (None: every row its own tile)."""
        tiles = None
        if cuts is not None:
            first, count = query_tiles(np.array([0, *cuts, len(rows)], dtype=np.int32))
            tiles = (cp.asarray(first), cp.asarray(count))
        return kernel.decode(cp.asarray(q[rows]), *args, cp.asarray(tables[rows]), cp.asarray(lens[rows]),
                             d ** -0.5, 0, splits, tiles=tiles).get()

    whole = attend(np.arange(600), [])
    assert np.array_equal(whole, attend(np.arange(600), [3, 19, 256, 257, 511]))
    assert np.array_equal(whole, attend(np.arange(600), None))
    assert np.array_equal(whole[300:], attend(np.arange(300, 600), [7]))
    single = np.array([0, 15, 16, 255, 256, 599])
    assert np.array_equal(whole[single], attend(single, None))
    # decode rows with the group's heads packed as one warp's mma rows (what `kernel` does from
    # PACK_MIN_ROWS rows, where group <= 16), and one warp per head, at any batch
    packed = PagedAttentionCuda(dtype_name, d, group, pack_min_rows=1)
    unpacked = PagedAttentionCuda(dtype_name, d, group, pack_heads=False)
    assert packed.packed == (group <= 16) and not unpacked.packed
    for other in (packed, unpacked):
        for rows in (np.arange(600), single):
            assert np.array_equal(whole[rows], other.decode(cp.asarray(q[rows]), *args, cp.asarray(tables[rows]),
                                                            cp.asarray(lens[rows]), d ** -0.5, 0, splits).get())
