"""A turn's plan as flat host arrays: what the model needs to run every scheduled token at once.

BatchInputs is also what a TP leader sends its followers each turn (every rank runs the model on
identical inputs), so it holds plain arrays only, no requests.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuron.engine.plan import ScheduledChunk, SchedulerOutput


@dataclass(frozen=True)
class BatchInputs:
    token_ids: np.ndarray      # int32 [T]: every scheduled token of every request, request by request
    positions: np.ndarray      # int32 [T]: each token's position in its request
    slot_mapping: np.ndarray   # int64 [T]: block_id * block_size + offset, where the token's KV goes
    query_start: np.ndarray    # int32 [N + 1]: request r's tokens are rows query_start[r]:query_start[r + 1]
    context_lens: np.ndarray   # int32 [N]: request r's KV length after this turn
    block_tables: np.ndarray   # int32 [N, max_blocks]: each request's blocks, padded with 0
    logits_rows: np.ndarray    # int32 [R]: the rows whose logits are wanted (empty on followers)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def for_follower(self) -> "BatchInputs":
        """Followers sample nothing: the same inputs without logits rows."""
        return BatchInputs(self.token_ids, self.positions, self.slot_mapping, self.query_start, self.context_lens,
                           self.block_tables, np.zeros(0, dtype=np.int32))


@dataclass(frozen=True)
class RowSpan:
    """Where one chunk's logits are in the turn's logits [R, vocab]: rows lo:hi."""
    chunk: ScheduledChunk
    lo: int
    hi: int


def wanted_rows(chunk: ScheduledChunk) -> int:
    """Logits rows a chunk asks for: every row of a scoring request that wants all positions, else
    the last row when the chunk samples (or ends a scoring prompt), else none."""
    request = chunk.request
    if request.want_logits and request.all_positions:
        return len(chunk.token_ids)
    return 1 if chunk.sample else 0


def build_batch(plan: SchedulerOutput, block_size: int) -> tuple[BatchInputs, list[RowSpan]]:
    chunks = plan.chunks
    lengths = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
    query_start = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=query_start[1:])
    total = int(query_start[-1])
    token_ids = np.empty(total, dtype=np.int32)
    positions = np.empty(total, dtype=np.int32)
    slot_mapping = np.empty(total, dtype=np.int64)
    context_lens = np.empty(len(chunks), dtype=np.int32)
    max_blocks = max((len(c.block_ids) for c in chunks), default=0)
    block_tables = np.zeros((len(chunks), max(max_blocks, 1)), dtype=np.int32)
    rows: list[int] = []
    spans: list[RowSpan] = []
    for r, chunk in enumerate(chunks):
        lo, hi = int(query_start[r]), int(query_start[r + 1])
        pos = np.arange(chunk.start, chunk.start + (hi - lo), dtype=np.int64)
        table = np.asarray(chunk.block_ids, dtype=np.int64)
        if len(table) * block_size < chunk.start + (hi - lo):
            raise ValueError(f"request {chunk.request.request_id}: {len(table)} blocks cannot hold "
                             f"{chunk.start + (hi - lo)} tokens")
        token_ids[lo:hi] = chunk.token_ids
        positions[lo:hi] = pos
        slot_mapping[lo:hi] = table[pos // block_size] * block_size + pos % block_size
        context_lens[r] = chunk.start + (hi - lo)
        block_tables[r, :len(table)] = table
        wanted = wanted_rows(chunk)
        if wanted:
            spans.append(RowSpan(chunk, len(rows), len(rows) + wanted))
            rows.extend(range(hi - wanted, hi))
    inputs = BatchInputs(token_ids, positions, slot_mapping, query_start, context_lens, block_tables,
                         np.asarray(rows, dtype=np.int32))
    return inputs, spans
