"""Attention of a flat batch over the paged KV cache.

Each turn's tokens arrive as one flat array of T rows: request r owns rows
query_start[r]:query_start[r+1] and, after this turn, has context_lens[r] tokens of KV (its cached
tokens plus this chunk). The chunk's keys and values are written into their slots first, then each
request attends over its own blocks, causally within the chunk. A long chunk is cut into query
pieces so the score tensor [heads, q, L] stays under SCORE_ELEMENTS_CAP.

With a `DecodeAttention` (the paged decode kernel on GPUs, its NumPy mirror in tests), every request
with one query row this turn is attended in one launch for the whole batch; chunks of several rows
take the gather path.
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
    # The requests with one query row (decode), for a DecodeAttention; None: none, or no kernel.
    decode: "DecodeBatch | None" = None

    @property
    def num_requests(self) -> int:
        return len(self.context_lens)


@dataclass
class DecodeBatch:
    requests: np.ndarray              # host: their indices among the turn's requests
    others: np.ndarray                # host: the other requests' indices (the gather path)
    rows: Any                         # device int64: their rows of the flat batch
    block_tables: Any                 # device int32 [n, max_blocks]
    context_lens: Any                 # device int32 [n]

    @classmethod
    def select(cls, xp, query_start: np.ndarray, context_lens: np.ndarray, block_tables: np.ndarray):
        single = np.diff(query_start) == 1
        requests = np.flatnonzero(single)
        if len(requests) == 0:
            return None
        return cls(requests, np.flatnonzero(~single), xp.asarray(query_start[requests].astype(np.int64)),
                   xp.asarray(np.ascontiguousarray(block_tables[requests])),
                   xp.asarray(context_lens[requests].astype(np.int32)))


class DecodeAttention:
    """One query token per request over its blocks, for a batch of requests at once. Its split of
    the keys is fixed per shard (from max_context), so a request's result does not depend on what
    else is in the batch."""

    def __init__(self, run, max_context: int):
        from neuron.kernels.paged_attention import num_splits
        self.run, self.splits = run, num_splits(max_context)

    @classmethod
    def cuda(cls, dtype_name: str, head_dim: int, group: int, max_context: int) -> "DecodeAttention":
        from neuron.kernels.paged_attention import PagedAttentionCuda
        return cls(PagedAttentionCuda(dtype_name, head_dim, group).decode, max_context)

    @classmethod
    def gathered(cls, max_context: int) -> "DecodeAttention":
        """CPU devices: every decode row's blocks gathered into one padded batch, one masked softmax."""
        return cls(gathered_decode_attention, max_context)

    @classmethod
    def numpy_mirror(cls, max_context: int) -> "DecodeAttention":
        from neuron.kernels.paged_attention import paged_decode_attention_numpy
        return cls(paged_decode_attention_numpy, max_context)

    def __call__(self, q, layer_keys, layer_values, batch: DecodeBatch, window: int | None):
        scale = 1.0 / float(q.shape[-1]) ** 0.5
        return self.run(q, layer_keys, layer_values, batch.block_tables, batch.context_lens, scale, window or 0,
                        splits=self.splits)


def gathered_decode_attention(q, layer_keys, layer_values, block_tables, context_lens, scale: float, window: int = 0,
                              splits: int = 1):
    """q [n, Hq, d], one query per request at position context_lens[r] - 1, over its blocks: the
    requests' keys gathered into [n, L, Hkv, d] (L: the longest context, rounded up to blocks), the
    positions past each context (or before its window) masked, one batched softmax. NumPy arrays;
    the arithmetic of causal_attention, so a request's result differs from its own pass only where
    the padding changes a sum's order (float rounding). `splits` is the kernel's and unused here."""
    n, hq, d = q.shape
    block_size, hkv = layer_keys.shape[1], layer_keys.shape[2]
    lens = np.asarray(context_lens)
    blocks = -(-int(lens.max()) // block_size)
    tables = np.asarray(block_tables)[:, :blocks]
    keys = layer_keys[tables].reshape(n, blocks * block_size, hkv, d).transpose(0, 2, 3, 1)    # [n, Hkv, d, L]
    values = layer_values[tables].reshape(n, blocks * block_size, hkv, d).transpose(0, 2, 1, 3)  # [n, Hkv, L, d]
    qh = q.reshape(n, hkv, hq // hkv, d)
    scores = (qh @ keys).astype(np.float32)                                                   # [n, Hkv, g, L]
    scores *= scale
    position = np.arange(blocks * block_size)[None, :]
    masked = position >= lens[:, None]
    if window:
        masked |= position <= (lens - 1 - window)[:, None]
    scores = np.where(masked[:, None, None, :], -np.inf, scores)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs.astype(values.dtype) @ values).reshape(n, hq, d)


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


def paged_attention(xp, q, layer_keys, layer_values, meta: AttentionMetadata, window: int | None,
                    decode: DecodeAttention | None = None):
    """q [T, Hq, d] of the whole batch over each request's blocks; returns [T, Hq * d]."""
    T, hq, d = q.shape
    out = xp.empty((T, hq * d), dtype=q.dtype)
    others = range(meta.num_requests)
    if decode is not None and meta.decode is not None:
        rows = meta.decode.rows
        out[rows] = decode(q[rows], layer_keys, layer_values, meta.decode, window).reshape(-1, hq * d)
        others = meta.decode.others
    for r in others:
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
