"""A turn's plan as flat host arrays: what the model needs to run every scheduled token at once.

BatchInputs is also what a TP leader sends its followers each turn (every rank runs the model on
identical inputs), so it holds plain arrays only, no requests.
"""
from __future__ import annotations

import itertools
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


@dataclass(slots=True)  # one per scoring request per turn
class RowSpan:
    """Where one chunk's logits are in the turn's logits [R, vocab]: rows lo:hi."""
    chunk: ScheduledChunk
    lo: int
    hi: int


@dataclass(slots=True)
class LogitRows:
    """Which rows of the turn's logits [R, vocab] belong to whom: each sampling chunk's one row
    (`sampling_rows[j]` for `sampling[j]`), and each scoring chunk's span."""
    sampling: list[ScheduledChunk]
    sampling_rows: np.ndarray          # int64 [len(sampling)]
    scoring: list[RowSpan]


def wanted_rows(chunk: ScheduledChunk) -> int:
    """Logits rows a chunk asks for: every row of a scoring request that wants all positions, else
    the last row when the chunk samples (or ends a scoring prompt), else none."""
    request = chunk.request
    if request.want_logits and request.all_positions:
        return len(chunk.token_ids)
    return 1 if chunk.sample else 0


def logit_rows(chunks: list[ScheduledChunk], query_start: np.ndarray) -> tuple[np.ndarray, LogitRows]:
    """The rows whose logits the turn computes (int32 [R], in chunk order) and whose they are."""
    if not any(c.request.want_logits for c in chunks):
        # no scoring (every decode turn): the last row of each sampling chunk, found with arrays
        # (a loop over the chunks cost ~1.7 us each, a tenth of a decode turn's host work)
        sample = np.fromiter((c.sample for c in chunks), dtype=bool, count=len(chunks))
        picked = np.flatnonzero(sample)
        rows = (query_start[1:][picked] - 1).astype(np.int32)
        sampling = list(chunks) if len(picked) == len(chunks) else [chunks[i] for i in picked.tolist()]
        return rows, LogitRows(sampling, np.arange(len(picked), dtype=np.int64), [])
    rows: list[int] = []
    sampling, sampling_rows, scoring = [], [], []
    for r, chunk in enumerate(chunks):
        wanted = wanted_rows(chunk)
        if not wanted:
            continue
        hi = int(query_start[r + 1])
        if chunk.request.want_logits:
            scoring.append(RowSpan(chunk, len(rows), len(rows) + wanted))
        else:
            sampling.append(chunk)
            sampling_rows.append(len(rows))
        rows.extend(range(hi - wanted, hi))
    return np.asarray(rows, dtype=np.int32), LogitRows(sampling, np.asarray(sampling_rows, dtype=np.int64), scoring)


# Decode turns of at most this many requests are built row by row in Python (few_decodes): below
# it, the whole-array path's ~30 NumPy calls of fixed cost are most of a turn's build (one row:
# 157 us on the H200 host, bench/NOTES.md session 20). On a 2-core dev machine, one row 57 -> 9
# us, 16 rows 73 -> 27, 64 rows 111 -> 83, 256 rows 245 -> 302 (NOTES, session 21).
FEW_DECODES = 32


def build_batch(plan: SchedulerOutput, block_size: int) -> tuple[BatchInputs, LogitRows]:
    """The plan as flat arrays, built with whole-array NumPy operations: the Python work left per
    request is reading its fields (a turn of 256 decodes is on the device thread's critical path)."""
    chunks = plan.chunks
    n = len(chunks)
    if n <= FEW_DECODES and all(len(c.token_ids) == 1 and c.sample and not c.request.want_logits for c in chunks):
        return few_decodes(chunks, block_size)
    lengths = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=n)
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=n)
    query_start = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=query_start[1:])
    total = int(query_start[-1])
    token_ids = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), dtype=np.int32, count=total)
    owner = np.repeat(np.arange(n), lengths)                       # each row's request
    positions = starts[owner] + np.arange(total) - query_start[:-1][owner]
    table_lens = np.fromiter((len(c.block_ids) for c in chunks), dtype=np.int64, count=n)
    context_lens = starts + lengths
    short = np.flatnonzero(table_lens * block_size < context_lens)
    if len(short):
        c = chunks[int(short[0])]
        raise ValueError(f"request {c.request.request_id}: {len(c.block_ids)} blocks cannot hold "
                         f"{int(context_lens[short[0]])} tokens")
    block_tables = np.zeros((n, max(int(table_lens.max(initial=0)), 1)), dtype=np.int32)
    flat_blocks: list[int] = []
    for c in chunks:              # list.extend and one conversion: a third of np.fromiter over a chain
        flat_blocks += c.block_ids
    # row-major order of the mask is the order of the flat list: request by request, block by block
    block_tables[np.arange(block_tables.shape[1]) < table_lens[:, None]] = flat_blocks
    slot_mapping = (block_tables[owner, positions // block_size].astype(np.int64) * block_size
                    + positions % block_size)
    rows, owners = logit_rows(chunks, query_start)
    inputs = BatchInputs(token_ids, positions.astype(np.int32), slot_mapping, query_start,
                         context_lens.astype(np.int32), block_tables, rows)
    return inputs, owners


def few_decodes(chunks: list[ScheduledChunk], block_size: int) -> tuple[BatchInputs, LogitRows]:
    """build_batch of a turn of a few one-token chunks that all sample (the same arrays)."""
    n = len(chunks)
    positions, slots = [], []
    width = 1
    for c in chunks:
        block, offset = divmod(c.start, block_size)
        if block >= len(c.block_ids):
            raise ValueError(f"request {c.request.request_id}: {len(c.block_ids)} blocks cannot hold "
                             f"{c.start + 1} tokens")
        positions.append(c.start)
        slots.append(c.block_ids[block] * block_size + offset)
        width = max(width, len(c.block_ids))
    block_tables = np.zeros((n, width), dtype=np.int32)
    for r, c in enumerate(chunks):
        block_tables[r, :len(c.block_ids)] = c.block_ids
    position_array = np.array(positions, dtype=np.int32)
    rows = np.arange(n, dtype=np.int32)
    inputs = BatchInputs(np.array([c.token_ids[0] for c in chunks], dtype=np.int32), position_array,
                         np.array(slots, dtype=np.int64), np.arange(n + 1, dtype=np.int32), position_array + 1,
                         block_tables, rows)
    return inputs, LogitRows(list(chunks), rows.astype(np.int64), [])


def feed_tokens(xp, token_ids, tokens_from) -> None:
    """token_ids[rows] = ids[index] on the device: a turn launched ahead takes the tokens the turn
    before it sampled, in stream order after them. When row i takes id i (no request of the turn
    before finished: most turns) that is one copy: a queued memory copy where both are int64 (a
    graph bucket's ids), else a copy kernel; the general case uploads both index arrays and runs
    a gather and a scatter, ~0.24 ms of the device thread's time at 256 rows on the H200 host
    (bench/NOTES.md, session 19)."""
    rows, ids, index = tokens_from
    rows = np.asarray(rows, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    k = len(rows)
    if k == 0:
        return
    if len(index) == k and k <= len(ids) and is_range(rows) and is_range(index):
        if xp is np or token_ids.dtype != ids.dtype or not (ids.flags.c_contiguous and token_ids.flags.c_contiguous):
            token_ids[:k] = ids[:k]
        else:   # CuPy's slice assignment costs ~90 us of Python for one id (NOTES, session 20)
            runtime = xp.cuda.runtime
            runtime.memcpyAsync(token_ids.data.ptr, ids.data.ptr, k * ids.itemsize, runtime.memcpyDeviceToDevice,
                                xp.cuda.get_current_stream().ptr)
        return
    token_ids[xp.asarray(rows)] = ids[xp.asarray(index)]


def is_range(values: np.ndarray) -> bool:
    """values == 0, 1, ..., len - 1, for a non-empty host array (checked with array operations: a
    Python loop over 256 rows would cost more than the upload it saves)."""
    return bool(values[0] == 0 and values[-1] == len(values) - 1 and (len(values) < 2 or (np.diff(values) == 1).all()))
