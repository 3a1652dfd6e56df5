"""Attention of a flat batch over the paged KV cache.

Each turn's tokens arrive as one flat array of T rows: request r owns rows
query_start[r]:query_start[r+1] and, after this turn, has context_lens[r] tokens of KV (its cached
tokens plus this chunk). The chunk's keys and values are written into their slots first, then each
request attends over its own blocks, causally within the chunk. A long chunk is cut into query
pieces so the score tensor [heads, q, L] stays under SCORE_ELEMENTS_CAP.

With a `DecodeAttention` whose `prefill_rows` is set (the paged attention kernels on GPUs, their
NumPy mirrors in tests), every row of the turn is attended in one launch (prompt chunks in tiles of
TILE_ROWS on the tensor-core kernel). On CPUs (`gathered`) only requests with one query row this
turn are; chunks of several rows take the gather path above.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuron.kernels.paged_attention import (TILE_ROWS, num_splits, paged_decode_attention_numpy,
                                            paged_tile_attention_numpy, query_tiles, tile_keys)

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
    """Query rows the paged attention kernel attends in one launch, each as its own sequence: a
    request's one decode token, or (`every_row`) every row of the turn, a prompt chunk's row seeing
    the keys up to its own position (its KV is written before the attention runs). With `tiles`, a
    tiled kernel reads each key once for up to TILE_ROWS rows of a chunk; the rows' results are the
    same as without."""
    requests: np.ndarray              # host: the turn's requests whose rows are all in the batch
    others: np.ndarray                # host: the other requests' indices (the gather path)
    rows: Any                         # device int64: their rows of the flat batch; None: every row, in order
    block_tables: Any                 # device int32 [n, max_blocks]
    context_lens: Any                 # device int32 [n]: keys each row sees, its own included
    max_context: int = 0              # host: the longest of context_lens (0: not known, the shard's maximum)
    # host (first row, row count) per tile of consecutive rows of one request, for a tiled kernel;
    # None: every row its own tile
    tiles: tuple[np.ndarray, np.ndarray] | None = None
    _device_tiles: dict = field(default_factory=dict, repr=False)

    def tile_pieces(self, xp, piece_rows: int) -> list[tuple[int, int, Any]]:
        """The tiles cut into launches of at most `piece_rows` rows (never inside a tile): per launch
        its rows a:b and its tiles as device (first row - a, row count). Uploaded once per turn,
        whatever the number of layers."""
        if piece_rows not in self._device_tiles:
            first, count = self.tiles
            pieces, start = [], 0
            while start < len(first):
                a = int(first[start])
                stop = start + 1
                while stop < len(first) and int(first[stop]) + int(count[stop]) - a <= piece_rows:
                    stop += 1
                b = int(first[stop - 1]) + int(count[stop - 1])
                pieces.append((a, b, (xp.asarray(first[start:stop] - a), xp.asarray(count[start:stop]))))
                start = stop
            self._device_tiles[piece_rows] = pieces
        return self._device_tiles[piece_rows]

    @classmethod
    def select(cls, xp, query_start: np.ndarray, context_lens: np.ndarray, block_tables: np.ndarray):
        single = np.diff(query_start) == 1
        requests = np.flatnonzero(single)
        if len(requests) == 0:
            return None
        rows = None if len(requests) == len(single) else xp.asarray(query_start[requests].astype(np.int64))
        return cls(requests, np.flatnonzero(~single), rows,
                   xp.asarray(np.ascontiguousarray(block_tables[requests])),
                   xp.asarray(context_lens[requests].astype(np.int32)), int(context_lens[requests].max()))

    @classmethod
    def every_row(cls, xp, query_start: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
                  tiled: bool = False):
        """Every row of the turn: row t of request r has r's block table and positions[t] + 1 keys.
        `tiled`: each request's rows also cut into tiles of TILE_ROWS for a tiled kernel."""
        owner = np.repeat(np.arange(len(query_start) - 1), np.diff(query_start))
        lens = positions.astype(np.int32) + 1
        everyone = np.arange(len(query_start) - 1)
        return cls(everyone, everyone[:0], None, xp.asarray(np.ascontiguousarray(block_tables[owner])),
                   xp.asarray(lens), int(lens.max(initial=0)),
                   query_tiles(query_start, TILE_ROWS) if tiled else None)


WORKSPACE_CAP_BYTES = 256 << 20   # the kernel's float32 split partials per launch; more rows: several launches


class DecodeAttention:
    """One query row per sequence over its blocks, for a batch of rows at once. The keys are split at
    the kernel's fixed positions (`count_splits`) whatever the batch, and splits past a row's context
    are skipped, so a row's result does not depend on what else is in the batch (nor on how many
    splits a launch has).
    `prefill_rows`: prompt chunks' rows go through it too (the kernel and its mirror), else only
    decode rows (the CPU's gathered path: its padded gather would be [rows, context] per row)."""

    def __init__(self, run, max_context: int, prefill_rows: bool, xp=np, tiled: bool = False,
                 count_splits=num_splits):
        self.run, self.prefill_rows, self.xp = run, prefill_rows, xp
        self.tiled = tiled   # `run` takes `tiles=`: a prompt chunk's rows share key reads
        self.count_splits = count_splits   # context -> the kernel's splits
        self.splits = count_splits(max_context)

    @classmethod
    def cuda(cls, dtype_name: str, head_dim: int, group: int, max_context: int) -> "DecodeAttention":
        import cupy

        from neuron.kernels.paged_attention import PagedAttentionCuda
        kernel = PagedAttentionCuda(dtype_name, head_dim, group)
        return cls(kernel.decode, max_context, True, cupy, tiled=kernel.tiled, count_splits=kernel.num_splits)

    @classmethod
    def gathered(cls, max_context: int) -> "DecodeAttention":
        """CPU devices: every decode row's blocks gathered into one padded batch, one masked softmax."""
        return cls(gathered_decode_attention, max_context, False)

    @classmethod
    def numpy_mirror(cls, max_context: int) -> "DecodeAttention":
        return cls(paged_decode_attention_numpy, max_context, True)

    @classmethod
    def numpy_tile_mirror(cls, max_context: int) -> "DecodeAttention":
        """The tensor-core kernel's mirror, given tiles as the kernel is: tests of the tile plumbing."""
        return cls(tiled_mirror, max_context, True, tiled=True)

    def piece_rows(self, q_heads: int, head_dim: int, max_context: int = 0) -> int:
        """Rows a launch takes (the workspace cap); a tiled batch's pieces are cut to at most this, at
        least TILE_ROWS. max_context 0: the shard's maximum."""
        splits = self.count_splits(max_context) if max_context else self.splits
        return max(1, WORKSPACE_CAP_BYTES // (q_heads * splits * (head_dim + 2) * 4))

    def __call__(self, q, layer_keys, layer_values, batch: DecodeBatch, window: int | None):
        n, hq, d = q.shape
        scale = 1.0 / float(d) ** 0.5
        splits = self.count_splits(batch.max_context) if batch.max_context else self.splits
        piece = self.piece_rows(hq, d, batch.max_context)
        if self.tiled and batch.tiles is not None:
            parts = [self.run(q[a:b], layer_keys, layer_values, batch.block_tables[a:b], batch.context_lens[a:b],
                              scale, window or 0, splits=splits, tiles=tiles)
                     for a, b, tiles in batch.tile_pieces(self.xp, max(piece, TILE_ROWS))]
        else:
            parts = [self.run(q[a:a + piece], layer_keys, layer_values, batch.block_tables[a:a + piece],
                              batch.context_lens[a:a + piece], scale, window or 0, splits=splits)
                     for a in range(0, n, piece)]
        return parts[0] if len(parts) == 1 else self.xp.concatenate(parts)


def tiled_mirror(q, layer_keys, layer_values, block_tables, context_lens, scale: float, window: int = 0,
                 splits: int = 1, tiles=None):
    """paged_tile_attention_numpy, after checking what the kernel relies on: the tiles cover the
    launch's rows once, in order, and each tile's rows share a block table and have consecutive
    positions. `splits` is the kernel's and unused here."""
    rows = q.shape[0]
    first, count = tiles if tiles is not None else (np.arange(rows), np.ones(rows, dtype=np.int32))
    covered = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)]) if len(first) else np.arange(0)
    if not np.array_equal(covered, np.arange(rows)) or (count > TILE_ROWS).any():
        raise AssertionError(f"tiles {list(zip(first, count))} do not cover rows 0..{rows - 1} once")
    for f, c in zip(first, count):
        if not (np.array_equal(block_tables[f:f + c], np.broadcast_to(block_tables[f], block_tables[f:f + c].shape))
                and np.array_equal(context_lens[f:f + c], context_lens[f] + np.arange(c))):
            raise AssertionError(f"tile at row {f} mixes requests or positions")
    return paged_tile_attention_numpy(q, layer_keys, layer_values, block_tables, context_lens, scale, window,
                                      step_keys=tile_keys(q.shape[-1]))


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
    if decode is not None and meta.decode is not None and meta.decode.rows is None:
        # every row is in the kernel's batch, in order: no gather or scatter of rows
        return decode(q, layer_keys, layer_values, meta.decode, window).reshape(T, hq * d)
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
