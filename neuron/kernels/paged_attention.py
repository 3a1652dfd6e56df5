"""Paged attention of query rows over a paged KV cache: its CuPy launcher and NumPy mirrors.

Two kernels with one contract. Each query row, q [B, q_heads, head_dim], attends over a paged KV
cache of one layer, k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim], through its row
of block_tables [B, max_blocks] (int32) to context_lens[b] keys (int32, its own included), and the
result is [B, q_heads, head_dim] in the cache's dtype. A sliding window of W keeps the last W keys.

- paged_attention.cu (CUDA cores, any storage dtype): one row per block, float32 throughout.
- paged_attention_mma.cu (tensor cores, bf16/f16 with head_dim a multiple of 16): tiles of up to
  TILE_ROWS consecutive rows of one sequence share each key read; probabilities enter P @ V as two
  16-bit parts (rounded value + remainder, about 16 bits): one part alone cost 1e-3 of cosine
  against transformers on the tiny Mistral fixture.
Both split the keys at fixed positions whatever the batch, so a row's result does not depend on the
rows launched with it: every SPLIT_KEYS keys, and the tensor-core kernel also every FINE_KEYS keys
within the first SPLIT_KEYS.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.dtypes import KERNEL_CODES

from . import load_module
from .launch import launch, programmatic


SPLIT_KEYS = 256      # keys per split block (PA_SPLIT)
GRID_WAVE_BLOCKS = 2048   # blocks a tensor-core launch keeps in its grid before blocks take several splits
# keys per split over the first SPLIT_KEYS (PA_FINE, tensor-core kernel): a short context gets
# several blocks a kv head. One 8B stream's decode had 8 blocks a layer, each walking 256 keys alone.
FINE_KEYS = 64
MAX_GROUP = 16        # query heads per kv head the kernel is built for
TILE_ROWS = 16        # query rows of one sequence per tensor-core tile (one mma row block)
MMA_WARPS = 4         # query heads per block of the tensor-core kernel (one warp each)
# decode batches from which the group's heads of a row share one warp. Before fine splits a warp
# per head won below ~512 blocks, so packing began at 64 rows; with them packed is as fast or faster
# at every batch (8B heads, ms a layer, packed / a warp per head, attention_bench-20261202-193649):
# 1 row 0.009 / 0.009 at 256 keys and 0.023 / 0.023 at 2,048; 16 rows 0.010 / 0.016 at 256 keys; 8
# rows 0.032 / 0.054 at 2,048. Its bits are the same either way (GPU test).
PACK_MIN_ROWS = 1


STATIC_SHARED_BUDGET = 44 * 1024   # of the 48 KiB a block may hold statically


def block_threads(head_dim: int, group: int, split_keys: int = SPLIT_KEYS) -> int:
    """Threads per block: as many as the static shared memory allows, up to 512. The P @ V loop runs
    over the split's keys once per threads / head_dim "parts", so with one part (128 threads at
    head_dim 128) a thread walks all 256 keys of its split one dependent load after another, which
    is what bounds a decode turn of few sequences (bench/NOTES.md)."""
    for threads in (512, 256, 128):
        parts = threads // head_dim
        shared = 4 * (group * head_dim + group * split_keys + 2 * group + parts * group * head_dim)
        if parts >= 1 and shared <= STATIC_SHARED_BUDGET:
            return threads
    return max(128, head_dim)


def fine_split(split_keys: int, fine_keys: int | None) -> int:
    """Keys per split over the first `split_keys` (None: no fine splits, split_keys throughout)."""
    return min(fine_keys or split_keys, split_keys)


def num_splits(max_context: int, split_keys: int = SPLIT_KEYS, fine_keys: int | None = None) -> int:
    """Splits of a context of `max_context` keys: every `fine_keys` keys up to `split_keys`, every
    `split_keys` after (fine_keys None: split_keys throughout)."""
    fine = fine_split(split_keys, fine_keys)
    if max_context <= split_keys:
        return max(1, math.ceil(max_context / fine))
    return split_keys // fine - 1 + math.ceil(max_context / split_keys)


def grid_splits(splits: int, blocks_per_split: int, split_keys: int = SPLIT_KEYS, fine_keys: int = FINE_KEYS) -> int:
    """The tensor-core kernel's grid depth for `splits`: all of them while the grid is small, else no
    fewer than the first split_keys' fine splits (a context of up to split_keys keys still gets a
    block a split) and enough for GRID_WAVE_BLOCKS; a block then takes every grid-depth-th split,
    each computed as a block of its own would (the bits do not depend on the depth). A decode
    graph sizes `splits` for the shard's max_context: at 256 rows and 2,048 keys that was 11 blocks
    a (row, kv head) where contexts of 192 keys needed 3, and the empty ones cost 0.4 ms of the
    8B's attention a turn (bench/NOTES.md, session 15)."""
    wanted = max(split_keys // fine_split(split_keys, fine_keys), -(-GRID_WAVE_BLOCKS // max(1, blocks_per_split)))
    return max(1, min(splits, wanted))


def split_ranges(context: int, split_keys: int = SPLIT_KEYS, fine_keys: int | None = None) -> list[tuple[int, int]]:
    """(first key, end) of each split of a context, as the tensor-core kernel cuts it."""
    fine = fine_split(split_keys, fine_keys)
    starts = list(range(0, min(context, split_keys), fine)) + list(range(split_keys, context, split_keys))
    return [(lo, min(context, lo + (fine if lo < split_keys else split_keys))) for lo in starts]


def _row_keys_values(k_cache, v_cache, table, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions 0..ctx-1 of one row's blocks, float32 [ctx, kv_heads, d] each."""
    positions = np.arange(ctx)
    blocks = np.asarray(table)[positions // k_cache.shape[1]]
    offsets = positions % k_cache.shape[1]
    return k_cache[blocks, offsets].astype(np.float32), v_cache[blocks, offsets].astype(np.float32)


def paged_decode_attention_numpy(q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int = 0,
                                 split_keys: int = SPLIT_KEYS, splits: int | None = None) -> np.ndarray:
    """The kernel's arithmetic on the host: float32 scores and sums per split, combined at the end."""
    batch, q_heads, d = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    splits = splits or num_splits(int(np.max(context_lens)), split_keys)
    out = np.zeros((batch, q_heads, d), dtype=np.float32)
    for b in range(batch):
        ctx = int(context_lens[b])
        keys, values = _row_keys_values(k_cache, v_cache, block_tables[b], ctx)
        qf = q[b].astype(np.float32).reshape(kv_heads, group, d) * np.float32(scale)
        numer = np.zeros((kv_heads, group, d), dtype=np.float32)
        maxes, sums, parts = [], [], []
        for s in range(splits):
            lo, hi = s * split_keys, min(ctx, (s + 1) * split_keys)
            if window > 0:
                lo = max(lo, ctx - window)
            if hi <= lo:
                continue
            scores = np.einsum("hgd,jhd->hgj", qf, keys[lo:hi])                  # [kv_heads, group, n]
            m = scores.max(axis=-1, keepdims=True)
            p = np.exp(scores - m)
            maxes.append(m)
            sums.append(p.sum(axis=-1, keepdims=True))
            parts.append(np.einsum("hgj,jhd->hgd", p, values[lo:hi]))
        top = np.max(np.stack(maxes), axis=0)
        denom = sum(sm * np.exp(m - top) for m, sm in zip(maxes, sums))
        for m, part in zip(maxes, parts):
            numer += part * np.exp(m - top)
        out[b] = (numer / denom).reshape(q_heads, d)
    return out.astype(k_cache.dtype)


def uses_tensor_cores(dtype_name: str, head_dim: int) -> bool:
    """Whether paged_attention_mma.cu serves this cache: 16-bit storage, head_dim in 16-column steps
    (the mma's k) and at most 256 (its output accumulators live in registers)."""
    return dtype_name in ("bfloat16", "float16") and head_dim % 16 == 0 and head_dim <= 256


def tile_keys(head_dim: int) -> int:
    """Keys staged in shared memory per step of the tensor-core kernel: two stages of K and V
    tiles fit the 48 KiB of static shared memory."""
    return 32 if head_dim <= 128 else 16


def query_tiles(query_start: np.ndarray, rows: int = TILE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of a flat batch: each request's rows query_start[r]:query_start[r+1] cut every `rows`
    rows. Returns (first row, row count) per tile, int32."""
    counts = np.diff(query_start).astype(np.int64)
    per_request = -(-counts // rows)
    offsets = np.arange(int(per_request.sum())) - np.repeat(np.cumsum(per_request) - per_request, per_request)
    first = np.repeat(query_start[:-1].astype(np.int64), per_request) + offsets * rows
    count = np.minimum(rows, np.repeat(counts, per_request) - offsets * rows)
    return first.astype(np.int32), count.astype(np.int32)


def paged_tile_attention_numpy(q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int = 0,
                               split_keys: int = SPLIT_KEYS, step_keys: int = 64,
                               fine_keys: int | None = FINE_KEYS) -> np.ndarray:
    """paged_attention_mma.cu's arithmetic on the host, one row at a time: within each split an
    online softmax over `step_keys` keys at a time (float32 scores, max and sum), each step's
    probabilities in float32 (the kernel's two 16-bit parts hold about 16 bits), the splits
    combined at the end (the kernel's splits: `split_ranges`). A tile shares key reads only, so rows are
    independent here."""
    batch, q_heads, d = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    out = np.zeros((batch, q_heads, d), dtype=np.float32)
    for b in range(batch):
        ctx = int(context_lens[b])
        keys, values = _row_keys_values(k_cache, v_cache, block_tables[b], ctx)
        qf = q[b].astype(np.float32).reshape(kv_heads, group, d)
        splits = []
        for lo, end in split_ranges(ctx, split_keys, fine_keys):
            m = np.full((kv_heads, group, 1), -np.inf, dtype=np.float32)
            total = np.zeros((kv_heads, group, 1), dtype=np.float32)
            acc = np.zeros((kv_heads, group, d), dtype=np.float32)
            for k0 in range(lo, end, step_keys):
                seen = np.arange(k0, min(end, k0 + step_keys))
                if window > 0:
                    seen = seen[seen > ctx - 1 - window]
                if len(seen) == 0:
                    continue
                scores = np.einsum("hgd,jhd->hgj", qf, keys[seen]) * np.float32(scale)
                m_new = np.maximum(m, scores.max(axis=-1, keepdims=True))
                alpha = np.exp(m - m_new)
                p = np.exp(scores - m_new)
                total = total * alpha + p.sum(axis=-1, keepdims=True)
                acc = acc * alpha + np.einsum("hgj,jhd->hgd", p, values[seen])
                m = m_new
            if np.isfinite(m).all():
                splits.append((m, total, acc))
        top = np.max(np.stack([s[0] for s in splits]), axis=0)
        denom = sum(t * np.exp(m - top) for m, t, _ in splits)
        numer = sum(a * np.exp(m - top) for m, _, a in splits)
        out[b] = (numer / denom).reshape(q_heads, d)
    return out.astype(k_cache.dtype)


@dataclass
class _Workspace:
    part_out: object
    part_ml: object


class PagedAttentionCuda:
    """Compiles the kernel that serves one (dtype, head_dim, group), the tensor-core one where
    `uses_tensor_cores`, and launches it on CuPy arrays on the current stream. `decode` allocates
    nothing when given `out` and a workspace from `workspace`, so it can be captured in a CUDA graph.
    `tiled`: whether `decode` takes `tiles` (rows of one sequence sharing key reads)."""

    def __init__(self, dtype_name: str, head_dim: int, group: int, split_keys: int = SPLIT_KEYS,
                 tensor_cores: bool = True, pack_heads: bool = True, pack_min_rows: int = PACK_MIN_ROWS,
                 fine_keys: int | None = FINE_KEYS):
        import cupy

        vec = 4 if dtype_name == "float32" else 8
        if head_dim % vec or group > MAX_GROUP:
            raise ValueError(f"paged attention needs head_dim a multiple of {vec} and at most {MAX_GROUP} "
                             f"query heads per kv head; got head_dim {head_dim}, group {group}")
        self.cp = cupy
        self.head_dim, self.group, self.split_keys = head_dim, group, split_keys
        self.tiled = tensor_cores and uses_tensor_cores(dtype_name, head_dim)   # False: benchmarks' baseline
        self.packed = False
        # fine splits on the tensor-core kernel only (the CUDA-core one serves float32 caches alone)
        self.fine_keys = fine_split(split_keys, fine_keys) if self.tiled else split_keys
        if self.tiled:
            fine = f"-DPA_FINE={self.fine_keys}"
            self.warps = min(group, MMA_WARPS)
            self.chunks = -(-group // self.warps)
            self.threads = 32 * self.warps
            module = load_module("paged_attention_mma.cu", KERNEL_CODES[dtype_name], f"-DPA_D={head_dim}",
                                 f"-DPA_G={group}", f"-DPA_W={self.warps}", f"-DPA_KT={tile_keys(head_dim)}",
                                 f"-DPA_SPLIT={split_keys}", fine)
            self._partial = module.get_function("paged_tile_partial")
            self._combine = module.get_function("paged_row_combine")
            # decode rows: one warp takes the group's heads of a row as its 16 mma rows, a quarter
            # of the mma work at 4 heads a kv head. Its bits equal the unpacked kernel's (the GPU
            # test holds them equal), so which one runs may depend on the batch.
            self.packed = pack_heads and group <= TILE_ROWS
            self.pack_min_rows = pack_min_rows
            if self.packed:
                packed = load_module("paged_attention_mma.cu", KERNEL_CODES[dtype_name], f"-DPA_D={head_dim}",
                                     f"-DPA_G={group}", "-DPA_W=1", f"-DPA_KT={tile_keys(head_dim)}",
                                     f"-DPA_SPLIT={split_keys}", fine, "-DPA_PACK=1")
                self._partial_packed = packed.get_function("paged_tile_partial")
        else:
            self.threads = block_threads(head_dim, group, split_keys)
            module = load_module("paged_attention.cu", KERNEL_CODES[dtype_name], f"-DPA_D={head_dim}",
                                 f"-DPA_G={group}", f"-DPA_THREADS={self.threads}", f"-DPA_SPLIT={split_keys}")
            self._partial = module.get_function("paged_decode_partial")
            self._combine = module.get_function("paged_decode_combine")

    def num_splits(self, max_context: int) -> int:
        """The `splits` a launch over contexts up to `max_context` needs."""
        return num_splits(max_context, self.split_keys, self.fine_keys)

    def workspace(self, batch: int, q_heads: int, splits: int) -> _Workspace:
        cp = self.cp
        return _Workspace(cp.empty((batch, q_heads, splits, self.head_dim), dtype=cp.float32),
                          cp.empty((batch, q_heads, splits, 2), dtype=cp.float32))

    def decode(self, q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int = 0,
               splits: int = 1, out=None, workspace: _Workspace | None = None, tiles=None):
        """`tiles`: (first row, row count) int32 device arrays from `query_tiles`, on the tiled
        kernel only; None: every row its own tile."""
        cp = self.cp
        batch, q_heads, d = q.shape
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        if out is None:
            out = cp.empty_like(q)
        if workspace is None:
            workspace = self.workspace(batch, q_heads, splits)
        table_width = np.int32(block_tables.shape[1])
        if not self.tiled:
            self._partial((batch, kv_heads, splits), (self.threads,),
                          (q, k_cache, v_cache, block_tables, context_lens, workspace.part_out, workspace.part_ml,
                           np.int32(kv_heads), np.int32(block_size), table_width, np.float32(scale), np.int32(window)))
            self._combine((batch * q_heads,), (min(128, d),),
                          (workspace.part_out, workspace.part_ml, out, np.int32(splits)))
            return out
        pdl = np.int32(programmatic())   # the kernels wait for the one before only when launched so
        first, count = tiles if tiles is not None else (context_lens, context_lens)   # unread when per row
        num_tiles = batch if tiles is None else len(first)
        if tiles is None and self.packed and batch >= self.pack_min_rows:
            partial, grid, threads = self._partial_packed, (batch, kv_heads), 32
        else:
            partial, grid, threads = self._partial, (num_tiles, kv_heads * self.chunks), self.threads
        grid = (*grid, grid_splits(splits, grid[0] * grid[1], self.split_keys, self.fine_keys))
        launch(partial, grid, (threads,),
               (q, k_cache, v_cache, block_tables, context_lens, first, count, workspace.part_out,
                workspace.part_ml, np.int32(kv_heads), np.int32(block_size), table_width,
                np.float32(scale * math.log2(math.e)), np.int32(window), np.int32(tiles is None), np.int32(splits),
                pdl))
        launch(self._combine, (batch * q_heads,), (min(128, d),),
               (workspace.part_out, workspace.part_ml, context_lens, out, np.int32(q_heads), np.int32(splits), pdl))
        return out
