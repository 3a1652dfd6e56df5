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
