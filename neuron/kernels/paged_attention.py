"""Paged decode attention (paged_attention.cu): its CuPy launcher and its NumPy mirror.

Both take one query token per sequence, q [B, q_heads, head_dim], against a paged KV cache of one
layer, k_cache / v_cache [num_blocks, block_size, kv_heads, head_dim], with block_tables
[B, max_blocks] (int32) and context_lens [B] (int32: keys per sequence, the query's own included).
They return [B, q_heads, head_dim] in the cache's dtype. A sliding window of W keeps the last W keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.dtypes import KERNEL_CODES

from . import load_module


SPLIT_KEYS = 256      # keys per split block (PA_SPLIT)
MAX_GROUP = 16        # query heads per kv head the kernel is built for


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


def num_splits(max_context: int, split_keys: int = SPLIT_KEYS) -> int:
    return max(1, math.ceil(max_context / split_keys))


def paged_decode_attention_numpy(q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int = 0,
                                 split_keys: int = SPLIT_KEYS, splits: int | None = None) -> np.ndarray:
    """The kernel's arithmetic on the host: float32 scores and sums per split, combined at the end."""
    batch, q_heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    splits = splits or num_splits(int(np.max(context_lens)), split_keys)
    out = np.zeros((batch, q_heads, d), dtype=np.float32)
    for b in range(batch):
        ctx = int(context_lens[b])
        positions = np.arange(ctx)
        blocks = np.asarray(block_tables[b])[positions // block_size]
        keys = k_cache[blocks, positions % block_size].astype(np.float32)      # [ctx, kv_heads, d]
        values = v_cache[blocks, positions % block_size].astype(np.float32)
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


@dataclass
class _Workspace:
    part_out: object
    part_ml: object


class PagedAttentionCuda:
    """Compiles paged_attention.cu for one (dtype, head_dim, group) and launches it on CuPy arrays on
    the current stream. `decode` allocates nothing when given `out` and a workspace from `workspace`,
    so it can be captured in a CUDA graph."""

    def __init__(self, dtype_name: str, head_dim: int, group: int, split_keys: int = SPLIT_KEYS):
        import cupy

        vec = 4 if dtype_name == "float32" else 8
        if head_dim % vec or group > MAX_GROUP:
            raise ValueError(f"paged attention needs head_dim a multiple of {vec} and at most {MAX_GROUP} "
                             f"query heads per kv head; got head_dim {head_dim}, group {group}")
        self.cp = cupy
        self.head_dim, self.group, self.split_keys = head_dim, group, split_keys
        self.threads = block_threads(head_dim, group, split_keys)
        module = load_module("paged_attention.cu", KERNEL_CODES[dtype_name], f"-DPA_D={head_dim}",
                             f"-DPA_G={group}", f"-DPA_THREADS={self.threads}", f"-DPA_SPLIT={split_keys}")
        self._partial = module.get_function("paged_decode_partial")
        self._combine = module.get_function("paged_decode_combine")

    def workspace(self, batch: int, q_heads: int, splits: int) -> _Workspace:
        cp = self.cp
        return _Workspace(cp.empty((batch, q_heads, splits, self.head_dim), dtype=cp.float32),
                          cp.empty((batch, q_heads, splits, 2), dtype=cp.float32))

    def decode(self, q, k_cache, v_cache, block_tables, context_lens, scale: float, window: int = 0,
               splits: int = 1, out=None, workspace: _Workspace | None = None):
        cp = self.cp
        batch, q_heads, d = q.shape
        kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        if out is None:
            out = cp.empty_like(q)
        if workspace is None:
            workspace = self.workspace(batch, q_heads, splits)
        self._partial((batch, kv_heads, splits), (self.threads,),
                      (q, k_cache, v_cache, block_tables, context_lens, workspace.part_out, workspace.part_ml,
                       np.int32(kv_heads), np.int32(block_size), np.int32(block_tables.shape[1]),
                       np.float32(scale), np.int32(window)))
        self._combine((batch * q_heads,), (min(128, d),), (workspace.part_out, workspace.part_ml, out, np.int32(splits)))
        return out
