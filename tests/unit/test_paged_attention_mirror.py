"""The paged decode attention mirror (the kernel's split/combine arithmetic on the host) equals plain
softmax attention over each sequence's keys, gathered through its block table."""
from __future__ import annotations

import numpy as np
import pytest

from neuron.kernels.paged_attention import paged_decode_attention_numpy


def make_cache(rng, num_blocks, block_size, kv_heads, d):
    k = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((num_blocks, block_size, kv_heads, d)).astype(np.float32)
    return k, v


def reference(q, k_cache, v_cache, tables, lens, scale, window):
    batch, q_heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros_like(q)
    for b in range(batch):
        ctx = int(lens[b])
        keep = np.arange(ctx)
        if window:
            keep = keep[keep >= ctx - window]
        blocks = tables[b][keep // block_size]
        keys, values = k_cache[blocks, keep % block_size], v_cache[blocks, keep % block_size]
        for h in range(q_heads):
            scores = keys[:, h // group] @ q[b, h] * scale
            p = np.exp(scores - scores.max())
            out[b, h] = (p / p.sum()) @ values[:, h // group]
    return out


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("split_keys", [4, 256])
def test_mirror_matches_gathered_softmax_attention(window, split_keys):
    rng = np.random.default_rng(0)
    block_size, kv_heads, group, d = 4, 2, 3, 8
    k_cache, v_cache = make_cache(rng, 40, block_size, kv_heads, d)
    lens = np.array([1, 7, 16, 23], dtype=np.int32)
    # every sequence gets distinct blocks in a shuffled order: the table, not the layout, decides
    perm = rng.permutation(40).astype(np.int32)
    tables = perm[:24].reshape(4, 6)
    q = rng.standard_normal((4, kv_heads * group, d)).astype(np.float32)
    got = paged_decode_attention_numpy(q, k_cache, v_cache, tables, lens, 0.35, window, split_keys=split_keys)
    want = reference(q, k_cache, v_cache, tables, lens, 0.35, window)
    assert np.abs(got - want).max() < 1e-5


def test_mirror_ignores_blocks_past_the_context():
    rng = np.random.default_rng(1)
    k_cache, v_cache = make_cache(rng, 8, 4, 1, 4)
    tables = np.array([[2, 5, 7]], dtype=np.int32)
    lens = np.array([6], dtype=np.int32)
    q = rng.standard_normal((1, 2, 4)).astype(np.float32)
    before = paged_decode_attention_numpy(q, k_cache, v_cache, tables, lens, 0.5)
    k_cache[7] = 1e6   # block 7 holds positions 8..11: past the context of 6
    k_cache[5, 2:] = -1e6   # positions 6 and 7 of the sequence: also past it
    after = paged_decode_attention_numpy(q, k_cache, v_cache, tables, lens, 0.5)
    assert np.array_equal(before, after)


def test_every_row_batch_gives_each_prompt_row_its_own_context():
    """A turn's rows as kernel sequences: row t of request r has r's table and positions[t] + 1 keys."""
    from neuron.layers.attention import DecodeBatch

    query_start = np.array([0, 3, 4, 6], dtype=np.int32)          # 3 prompt rows, 1 decode row, 2 rows
    positions = np.array([0, 1, 2, 9, 4, 5], dtype=np.int32)
    tables = np.array([[7, 0], [3, 5], [1, 2]], dtype=np.int32)
    batch = DecodeBatch.every_row(np, query_start, positions, tables)
    assert batch.rows is None and len(batch.others) == 0
    assert batch.context_lens.tolist() == [1, 2, 3, 10, 5, 6]
    assert batch.block_tables.tolist() == [[7, 0]] * 3 + [[3, 5]] + [[1, 2]] * 2
    assert batch.max_context == 10


def test_rows_split_over_launches_and_fewer_splits_give_the_same_result(monkeypatch):
    """The workspace cap cuts a big batch into launches, and a launch takes only the splits its
    longest row needs: neither changes a row's result (splits past a context are skipped)."""
    from neuron.layers import attention

    rng = np.random.default_rng(3)
    k_cache, v_cache = make_cache(rng, 40, 16, 2, 8)
    lens = rng.integers(1, 600, 9).astype(np.int32)         # 1-3 splits of 256 keys
    tables = np.stack([rng.permutation(40) for _ in lens]).astype(np.int32)
    q = rng.standard_normal((9, 4, 8)).astype(np.float32)
    op = attention.DecodeAttention.numpy_mirror(max_context=1024)   # 4 splits per shard
    whole = op(q, k_cache, v_cache, attention.DecodeBatch(np.arange(9), np.arange(0), None, tables, lens), None)
    monkeypatch.setattr(attention, "WORKSPACE_CAP_BYTES", 1)  # one row per launch
    pieces = op(q, k_cache, v_cache, attention.DecodeBatch(np.arange(9), np.arange(0), None, tables, lens,
                                                           int(lens.max())), None)
    np.testing.assert_array_equal(whole, pieces)
    np.testing.assert_allclose(whole, reference(q, k_cache, v_cache, tables, lens, 1 / np.sqrt(8), 0), rtol=1e-5,
                               atol=1e-5)


def test_block_threads_stay_within_static_shared_memory():
    from neuron.kernels.paged_attention import STATIC_SHARED_BUDGET, block_threads

    for d in (64, 128):
        for group in (1, 2, 4, 8, 16):
            threads = block_threads(d, group)
            parts = threads // d
            shared = 4 * (group * d + group * 256 + 2 * group + parts * group * d)
            assert threads >= d and shared <= STATIC_SHARED_BUDGET
    assert block_threads(128, 4) == 512   # four threads per output dim in P @ V


def test_query_tiles_cut_each_request_every_sixteen_rows():
    from neuron.kernels.paged_attention import query_tiles

    first, count = query_tiles(np.array([0, 1, 34, 34, 50], dtype=np.int32))   # 1, 33, 0, 16 rows
    assert first.tolist() == [0, 1, 17, 33, 34]
    assert count.tolist() == [1, 16, 16, 1, 16]


def test_tile_pieces_cover_every_row_once_and_never_cut_a_tile():
    from neuron.layers.attention import DecodeBatch

    query_start = np.array([0, 1, 40, 41, 141], dtype=np.int32)
    positions = np.concatenate([[9], np.arange(39), [3], np.arange(100)]).astype(np.int32)
    tables = np.zeros((4, 8), dtype=np.int32)
    batch = DecodeBatch.every_row(np, query_start, positions, tables, tiled=True)
    for piece_rows in (16, 40, 1000):
        covered = []
        for a, b, (first, count) in batch.tile_pieces(np, piece_rows):
            assert b - a <= piece_rows
            assert first[0] == 0 and first[-1] + count[-1] == b - a
            covered += [a + f + i for f, c in zip(first, count) for i in range(c)]
        assert covered == list(range(141))


def test_tile_mirror_equals_softmax_attention_in_float32():
    from neuron.kernels.paged_attention import paged_tile_attention_numpy

    rng = np.random.default_rng(4)
    k_cache, v_cache = make_cache(rng, 40, 4, 2, 8)
    lens = np.array([1, 7, 16, 23, 130], dtype=np.int32)
    tables = np.stack([rng.permutation(40) for _ in lens]).astype(np.int32)
    q = rng.standard_normal((5, 6, 8)).astype(np.float32)
    for window in (0, 5):
        want = reference(q, k_cache, v_cache, tables, lens, 0.35, window)
        for fine_keys in (None, 16):   # 64-key splits throughout, or 16-key ones over the first 64 keys
            got = paged_tile_attention_numpy(q, k_cache, v_cache, tables, lens, 0.35, window, split_keys=64,
                                             step_keys=8, fine_keys=fine_keys)
            assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("split_keys,fine_keys", [(256, 64), (256, 32), (256, None), (64, 256)])
def test_splits_are_fixed_key_ranges_whatever_the_context(split_keys, fine_keys):
    """The kernel's splits tile [0, context) in order, as many as num_splits says, and a shorter
    context's splits are a longer one's cut at its end: a key's split never depends on the context
    (nor, so, on what a row is batched with)."""
    from neuron.kernels.paged_attention import num_splits, split_ranges

    longest = split_ranges(3000, split_keys, fine_keys)
    fine = min(fine_keys or split_keys, split_keys)
    assert [hi - lo for lo, hi in longest[: split_keys // fine]] == [fine] * (split_keys // fine)
    for context in (1, 31, 32, 63, 64, 65, 255, 256, 257, 700, 3000):
        ranges = split_ranges(context, split_keys, fine_keys)
        assert len(ranges) == num_splits(context, split_keys, fine_keys)
        assert ranges[0][0] == 0 and ranges[-1][1] == context
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert ranges[:-1] == longest[: len(ranges) - 1] and ranges[-1][0] == longest[len(ranges) - 1][0]


def test_grid_depth_leaves_out_only_splits_short_contexts_never_reach():
    from neuron.kernels.paged_attention import FINE_KEYS, GRID_WAVE_BLOCKS, grid_splits, num_splits
    splits = num_splits(2048, fine_keys=FINE_KEYS)                                      # 3 fine + 8 coarse = 11
    assert splits == 11
    assert grid_splits(splits, 256 * 8) == 4                         # big batch: the first 256 keys' 4 fine splits
    assert grid_splits(splits, 1 * 8) == splits                      # one stream: a block a split
    assert grid_splits(splits, 16 * 8) == min(splits, -(-GRID_WAVE_BLOCKS // 128))
    assert grid_splits(2, 256 * 8) == 2 and grid_splits(1, 10 ** 6) == 1   # never more than the splits
