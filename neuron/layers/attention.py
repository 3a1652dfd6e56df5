"""Attention of a flat batch over the paged KV cache.

Each turn's tokens arrive as one flat array of T rows: request r owns rows
query_start[r]:query_start[r+1] and, after this turn, has context_lens[r] tokens of KV (its cached
tokens plus this chunk). The chunk's keys and values are written into their slots first, then each
request attends over its own blocks, causally within the chunk. A long chunk is cut into query
pieces so the score tensor [heads, q, L] stays under SCORE_ELEMENTS_CAP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SCORE_ELEMENTS_CAP = 1 << 24   # float32 scores per query piece: 64 MiB


@dataclass
class AttentionMetadata:
    """What the attention layer needs for one turn; host arrays give the loop bounds (no device
    sync to learn them), device arrays are indexed on the device."""
    slot_mapping: Any                 # device int64 [T]: where each row's KV is written
    block_tables: Any                 # device int32 [N, max_blocks]
    query_start: np.ndarray           # host [N + 1]
    context_lens: np.ndarray          # host [N]
    block_size: int

    @property
    def num_requests(self) -> int:
        return len(self.context_lens)


def _bmm(xp, a, b):
    """Batched a @ b. CuPy has no batched bfloat16 GEMM, so there the product is taken in float32 and
    rounded once to bfloat16: what cuBLAS does for a bf16 GEMM (float32 accumulation, one rounding)."""
    if xp is not np and a.dtype == b.dtype and a.dtype.name == "bfloat16":
        return (a.astype(xp.float32) @ b.astype(xp.float32)).astype(a.dtype)
    return a @ b


def causal_attention(xp, q, keys, values, start: int, window: int | None):
    """Causal GQA attention of q [T, Hq, d] (positions start..) over keys/values [Hkv, L, d] (positions 0..L-1)."""
    T, hq, d = q.shape
    hkv, length = keys.shape[0], keys.shape[1]
    group = hq // hkv
    qh = q.reshape(T, hkv, group, d).transpose(1, 2, 0, 3)                  # [Hkv, g, T, d]
    scores = _bmm(xp, qh, keys.transpose(0, 2, 1)[:, None]).astype(xp.float32)  # [Hkv, g, T, L]
    scores *= 1.0 / float(d) ** 0.5
    q_pos = xp.arange(start, start + T)[:, None]
    k_pos = xp.arange(length)[None, :]
    masked = k_pos > q_pos
    if window:
        masked |= k_pos <= q_pos - window
    scores = xp.where(masked, -xp.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = xp.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = _bmm(xp, probs.astype(values.dtype), values[:, None])               # [Hkv, g, T, d]
    return out.transpose(2, 0, 1, 3).reshape(T, hq * d)


def write_kv(flat_keys, flat_values, k, v, slot_mapping) -> None:
    """k, v [T, Hkv, d] into their slots of the layer's flat [slots, Hkv, d] views."""
    flat_keys[slot_mapping] = k
    flat_values[slot_mapping] = v


def paged_attention(xp, q, layer_keys, layer_values, meta: AttentionMetadata, window: int | None):
    """q [T, Hq, d] of the whole batch over each request's blocks; returns [T, Hq * d]."""
    T, hq, d = q.shape
    out = xp.empty((T, hq * d), dtype=q.dtype)
    for r in range(meta.num_requests):
        q_lo, q_hi = int(meta.query_start[r]), int(meta.query_start[r + 1])
        length = int(meta.context_lens[r])
        start = length - (q_hi - q_lo)                 # position of the chunk's first token
        first = 0
        if window:
            first = max(0, start - window + 1) // meta.block_size * meta.block_size  # older blocks are all masked
        blocks = meta.block_tables[r, first // meta.block_size: -(-length // meta.block_size)]
        hkv = layer_keys.shape[2]
        keys = layer_keys[blocks].reshape(-1, hkv, d)[: length - first].transpose(1, 0, 2)   # [Hkv, L, d]
        values = layer_values[blocks].reshape(-1, hkv, d)[: length - first].transpose(1, 0, 2)
        piece = max(1, SCORE_ELEMENTS_CAP // (hq * max(length - first, 1)))
        for a in range(q_lo, q_hi, piece):
            b = min(a + piece, q_hi)
            visible = start + (b - q_lo) - first       # keys up to the piece's last query position
            out[a:b] = causal_attention(xp, q[a:b], keys[:, :visible], values[:, :visible],
                                        start + (a - q_lo) - first, window)
    return out
