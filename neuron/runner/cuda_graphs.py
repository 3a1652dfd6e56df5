"""Decode turns replayed from CUDA graphs, one per batch-size bucket.

A decode-only turn (one new token per request) of n requests runs the graph of the smallest bucket
B >= n. The graph was captured at load over static device buffers of B rows (token ids, positions,
slot mapping, block tables, context lengths); a turn copies its rows into them and pads the rest
with a harmless row: token 0 at position 0, writing its KV into the cache's scratch block (which
the block manager never hands out) and attending over that block alone. Python then launches one
graph per turn instead of a few hundred kernels.

Intermediate arrays of every capture come from one private memory pool that only graphs use, so
no eager allocation can take memory a graph writes on replay; the graphs never run at the same
time, so they share that pool (as vLLM's graphs share theirs). Nothing that must survive another
graph's replay lives in that pool: each bucket's input buffers come from the ordinary allocator,
and a graph's logits are read before any other graph runs.

Mixed turns (`mixed_chunk` > 0): while requests decode, a long prompt arrives in chunks of
max_prefill_chunk tokens (Scheduler), so the turns of its admission are n decode rows plus one
chunk of at most that many rows, which launched eagerly took longer on the host than on the device
(an 8B turn of 64 decode rows and a 128-token chunk: ~11 ms of launches for ~7 ms of work,
bench/NOTES.md session 17). A mixed bucket is a decode bucket of B rows followed by C chunk rows,
attended in tiles (the B rows one each, the chunk TILE_ROWS at a time), with logits for the B rows
and one more row, uploaded each turn: the chunk's last row when it samples (a prompt's last chunk).
A chunk shorter than C is padded with rows that continue its positions (so a tile's rows stay
consecutive positions of one sequence, as the tiled kernel assumes), whose KV goes to the scratch
block and whose results nobody reads; a row's result does not depend on its tile-mates
(kernels/paged_attention_mma.cu), so the chunk's rows get what they get without padding. B = 0 is
a prompt alone (one request, nothing decoding: one stream's first token), which launched eagerly
cost ~6 ms of host time for ~0.7 ms of device work on a 1B. The rest of a mixed turn's inputs are
a decode bucket's.

On a CPU device (tests) the same buffers, padding and kernel path run eagerly: `capture=False`.

On by default on GPUs (`--no-cuda-graphs` turns it off). The products go through cuBLAS called by
ctypes (kernels/cublas_gemm.py): CuPy's own cuBLAS bindings refuse to run inside a capture.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from neuron.kernels.argmax import argmax_rows_cuda
from neuron.kernels.launch import programmatic_launches
from neuron.kernels.paged_attention import TILE_ROWS, query_tiles
from neuron.layers.attention import AttentionMetadata, DecodeBatch

from .batch import BatchInputs, feed_tokens
from .graph_inputs import GraphInputs, put

log = structlog.get_logger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def is_decode_only(inputs: BatchInputs) -> bool:
    """Every request runs exactly one token and all (or, on a follower, none) of them sample."""
    n = len(inputs.context_lens)
    return n > 0 and inputs.num_tokens == n and len(inputs.logits_rows) in (0, n)


@dataclass
class _Bucket:
    size: int
    token_ids: object
    positions: object
    slot_mapping: object
    block_tables: object
    context_lens: object
    rows: object
    inputs: GraphInputs              # the arrays above are its device views; a turn writes them in one copy
    logits: object = None
    graph: object = None
    chunk: int = 0                   # a mixed bucket's prompt rows after its `size` decode rows
    attention: object = None         # a mixed bucket's DecodeBatch (its tiles on the device), one for every turn
    # a decode bucket's greedy pick of its rows' logits, captured as a second graph (a turn of
    # greedy rows then launches two graphs, not the pick's allocations and two kernels: ~90 us of
    # the device thread's time a turn on the H200 host, bench/NOTES.md session 21)
    pick_rows: object = None         # 0..size-1, int64
    greedy_ids: object = None        # int64 [size]: the pick's output, outside the private pool
    pick: object = None


@dataclass
class CaptureReport:
    sizes: list[int] = field(default_factory=list)
    seconds: float = 0.0
    pool_bytes: int = 0
    skipped: str = ""
    programmatic: bool = True
    mixed_sizes: list[int] = field(default_factory=list)   # decode rows of the mixed buckets captured


class DecodeGraphs:
    def __init__(self, model, kv, max_seqs: int, capture: bool, programmatic: bool = True, mixed_chunk: int = 0):
        """`model.decode_attention` must be set: graph rows attend through the paged attention kernel.
        `programmatic`: in the one-row graph (the GEMV layer: ~230 short kernels at the 8B) the
        kernels that allow it start while the kernel before them runs (kernels/launch.py); if a
        capture fails that way, it is captured again without. Larger buckets launch the ordinary
        way: their turns are long kernels of many blocks, where the per-block wait cost more than
        the launch gaps it hid (engine_bench on an H200: one 8B stream 4.25 -> 4.14 ms a turn, one
        1B stream 0.98 -> 0.92; 1B x 256 2.53 -> 2.73, 8B x 256 10.81 -> 10.93, 64 unchanged).
        `mixed_chunk`: also capture mixed buckets of that many prompt rows (module docstring); only
        with an attention that takes prompt rows in tiles (the tensor-core kernel, or its mirror)."""
        self.model, self.kv, self.capture_graphs = model, kv, capture
        self.programmatic = programmatic
        self.xp = model.xp
        self.max_blocks = -(-kv.max_context // kv.block_size)
        wanted = [b for b in BATCH_BUCKETS if b < max_seqs] + [min(max_seqs, BATCH_BUCKETS[-1])]
        self.sizes = sorted(set(wanted))
        self.buckets: dict[int, _Bucket] = {}
        tiled = model.decode_attention is not None and model.decode_attention.prefill_rows and model.decode_attention.tiled
        self.mixed_chunk = mixed_chunk if tiled else 0
        self.mixed: dict[int, _Bucket] = {}      # decode rows -> the mixed bucket
        self.pool = None
        self.report = CaptureReport(programmatic=programmatic)

    # -- load time

    def prepare(self, budget_seconds: float = 60.0, budget_bytes: int = 2 << 30) -> CaptureReport:
        """Build every bucket's buffers and capture its graph, largest first (smaller ones reuse the
        pool's memory), until the time or memory budget is spent; the rest run eagerly."""
        started = time.perf_counter()
        if self.capture_graphs:
            self.pool = self.xp.cuda.MemoryPool()
        # decode buckets first: a budget spent leaves mixed turns eager, not decode turns; a mixed
        # bucket of no decode rows serves a prompt alone
        wanted = [(size, 0) for size in sorted(self.sizes, reverse=True)]
        wanted += [(size, self.mixed_chunk) for size in sorted([*self.sizes, 0], reverse=True) if self.mixed_chunk]
        for size, chunk in wanted:
            if time.perf_counter() - started > budget_seconds:
                self.report.skipped = f"time budget of {budget_seconds:g} s spent"
                break
            if self.pool is not None and self.pool.total_bytes() > budget_bytes:
                self.report.skipped = f"memory budget of {budget_bytes >> 20} MiB spent"
                break
            if chunk:
                try:
                    self.mixed[size] = self._build(size, chunk)
                except Exception as err:  # noqa: BLE001 - mixed turns then launch eagerly; decode graphs stay
                    log.warning("mixed graph capture failed; those turns run eagerly", size=size, chunk=chunk,
                                error=f"{type(err).__name__}: {err}")
                    self.report.skipped = f"mixed bucket {size} + {chunk}: {type(err).__name__}"
                    break
                self.report.mixed_sizes.append(size)
            else:
                self.buckets[size] = self._build(size)
                self.report.sizes.append(size)
        self.report.seconds = time.perf_counter() - started
        self.report.pool_bytes = int(self.pool.total_bytes()) if self.pool is not None else 0
        log.info("decode graphs ready", captured=self.capture_graphs, sizes=sorted(self.report.sizes),
                 mixed_sizes=sorted(self.report.mixed_sizes), mixed_chunk=self.mixed_chunk or None,
                 seconds=round(self.report.seconds, 2), pool_mib=self.report.pool_bytes >> 20,
                 programmatic=self.programmatic, skipped=self.report.skipped or None)
        return self.report

    def _build(self, size: int, chunk: int = 0) -> _Bucket:
        xp, kv = self.xp, self.kv
        pad = kv.scratch_block
        total = size + chunk
        # The inputs stay outside the private pool: memory there holds the intermediates of the
        # graphs captured before, which their replays overwrite (a decode bucket's `rows`, never
        # changed, would then pick other rows' logits).
        inputs = GraphInputs(xp, {"block_tables": ((total, self.max_blocks), np.int32),
                                  "slot_mapping": ((total,), np.int64),
                                  # a mixed bucket's logits rows: its decode rows and one chunk row
                                  "rows": ((size + (1 if chunk else 0),), np.int64),
                                  # int64, the sampler's ids' type: a turn fed on the device copies them as they are
                                  "token_ids": ((total,), np.int64), "positions": ((total,), np.int32),
                                  "context_lens": ((total,), np.int32)})
        # Padding everywhere; a mixed bucket's chunk rows start as a chunk at position 0 over the
        # scratch block.
        staged = inputs.stage()
        staged["block_tables"].fill(pad)
        staged["slot_mapping"].fill(pad * kv.block_size)
        staged["rows"][:] = np.arange(len(staged["rows"]))
        staged["context_lens"].fill(1)
        staged["context_lens"][size:] = np.arange(1, chunk + 1)
        staged["positions"][:] = staged["context_lens"] - 1
        inputs.upload()
        device = inputs.device
        bucket = _Bucket(size, token_ids=device["token_ids"], positions=device["positions"],
                         slot_mapping=device["slot_mapping"], block_tables=device["block_tables"],
                         context_lens=device["context_lens"], rows=device["rows"], inputs=inputs, chunk=chunk)
        if chunk:
            query_start = np.append(np.arange(size + 1), total).astype(np.int32)
            bucket.attention = DecodeBatch(np.arange(size + 1), np.arange(0), None, bucket.block_tables,
                                           bucket.context_lens, tiles=query_tiles(query_start))
            # its tiles go up now, from the ordinary allocator: uploaded by the warm-up inside the
            # private pool, another graph's replay overwrote them (an illegal address on the H200)
            heads = self.model.heads
            rows = self.model.decode_attention.piece_rows(heads.q_heads, heads.head_dim)
            bucket.attention.tile_pieces(xp, max(rows, TILE_ROWS))
        else:   # the pick's rows and ids are read and written by every replay: outside the pool too
            bucket.pick_rows = xp.arange(size, dtype=xp.int64)
            bucket.greedy_ids = xp.zeros(size, dtype=xp.int64)
        with self._allocating():
            if self.capture_graphs:
                try:
                    with programmatic_launches(self.programmatic and size == 1):
                        self._capture(bucket)
                except Exception as err:  # noqa: BLE001 - a driver without PDL in graphs still gets graphs
                    if not self.programmatic:
                        raise
                    log.warning("decode graph capture with programmatic launches failed; capturing without them",
                                error=str(err))
                    self.programmatic = self.report.programmatic = False
                    self._capture(bucket)
        return bucket

    def _capture(self, bucket: _Bucket) -> None:
        bucket.logits, bucket.graph = self._capture_one(lambda: self._forward(bucket))
        if bucket.greedy_ids is not None:
            _, bucket.pick = self._capture_one(lambda: self._pick(bucket, bucket.logits))

    def _capture_one(self, work):
        """(work's result, the graph of work), after one run outside the capture (which compiles
        kernels and sets up cuBLAS)."""
        work()
        stream = self.xp.cuda.get_current_stream()
        stream.synchronize()
        stream.begin_capture()
        try:
            result = work()
        finally:
            graph = stream.end_capture()
        graph.upload(stream)
        stream.synchronize()
        return result, graph

    def _pick(self, bucket: _Bucket, logits):
        """The first maximum of each of the bucket's rows of logits, into its greedy_ids."""
        if self.xp is np:
            bucket.greedy_ids[:] = np.argmax(logits, axis=-1)
        else:
            argmax_rows_cuda(logits, bucket.pick_rows, out=bucket.greedy_ids)
        return bucket.greedy_ids

    def _allocating(self):
        if self.pool is None:
            import contextlib
            return contextlib.nullcontext()
        return self.xp.cuda.using_allocator(self.pool.malloc)

    def _forward(self, bucket: _Bucket):
        every = np.arange(bucket.size)
        if bucket.chunk:
            # the same DecodeBatch every time: its tiles are uploaded once, by the warm-up before the capture
            decode = bucket.attention
            query_start = np.append(np.arange(bucket.size + 1), bucket.size + bucket.chunk).astype(np.int32)
        else:
            decode = DecodeBatch(every, every[:0], None, bucket.block_tables, bucket.context_lens)
            query_start = np.arange(bucket.size + 1, dtype=np.int32)
        meta = AttentionMetadata(slot_mapping=bucket.slot_mapping, block_tables=bucket.block_tables,
                                 query_start=query_start, context_lens=np.ones(len(query_start) - 1, dtype=np.int32),
                                 block_size=self.kv.block_size, decode=decode)
        return self.model.forward_batch(bucket.token_ids, bucket.positions, meta, self.kv, bucket.rows)

    def release(self) -> None:
        """Free the graphs and their private pool now (a shard's drop, or a load that failed after
        capture). Dropping the last reference is not enough: CuPy's pool (14.x) keeps its free
        blocks when it is itself garbage, so every load/drop left the pool's size behind (20 cycles
        of a small model with mixed buckets: 204 MiB; bench/NOTES.md, session 18). Everything
        allocated from the pool (the graphs' logits) goes first, then the pool returns its blocks."""
        if self.capture_graphs:
            self.xp.cuda.get_current_stream().synchronize()   # no replay still reading the pool
        for bucket in (*self.buckets.values(), *self.mixed.values()):
            bucket.graph = bucket.logits = bucket.pick = None
        self.buckets.clear()
        self.mixed.clear()
        if self.pool is not None:
            self.pool.free_all_blocks()
            self.pool = None

    # -- every turn

    def can_run(self, inputs: BatchInputs) -> bool:
        return (bool(self.buckets) and is_decode_only(inputs) and len(inputs.context_lens) <= max(self.buckets)
                and inputs.block_tables.shape[1] <= self.max_blocks)

    def can_run_mixed(self, inputs: BatchInputs) -> bool:
        """A turn of one-token chunks, each sampling, and one chunk of 2 to mixed_chunk tokens, sampling
        or not, that fits a mixed bucket: its padding rows' positions stay inside the shard's context."""
        if not self.mixed:
            return False
        lengths = np.diff(inputs.query_start)
        long = np.flatnonzero(lengths != 1)
        if len(long) != 1 or len(lengths) - 1 > max(self.mixed) or inputs.block_tables.shape[1] > self.max_blocks:
            return False
        k = int(long[0])
        lo, hi = int(inputs.query_start[k]), int(inputs.query_start[k + 1])
        if hi - lo > self.mixed_chunk or int(inputs.positions[lo]) + self.mixed_chunk > self.kv.max_context:
            return False
        singles = inputs.query_start[:-1][lengths == 1]
        rows = inputs.logits_rows
        if len(rows) == len(singles):                       # the chunk samples nothing
            return bool(np.array_equal(rows, singles))
        return len(rows) == len(singles) + 1 and bool(np.array_equal(rows, np.insert(singles, k, hi - 1)))

    def run_mixed(self, inputs: BatchInputs):
        """Logits [R, vocab] of a can_run_mixed turn, one per logits row, in their order."""
        lengths = np.diff(inputs.query_start)
        single = lengths == 1
        n = int(single.sum())
        bucket = self.mixed[min(b for b in self.mixed if b >= n)]
        size, chunk, pad = bucket.size, bucket.chunk, self.kv.scratch_block
        k = int(np.flatnonzero(~single)[0])
        lo, hi = int(inputs.query_start[k]), int(inputs.query_start[k + 1])
        real = hi - lo
        rows = inputs.query_start[:-1][single]                        # the one-token rows, in order
        # the chunk's rows continue past its end to the bucket's C rows (module docstring)
        chunk_positions = np.arange(int(inputs.positions[lo]), int(inputs.positions[lo]) + chunk, dtype=np.int32)
        staged = bucket.inputs.stage()
        decode, chunk_rows, real_rows = slice(0, n), slice(size, None), slice(size, size + real)
        for name, fill in (("token_ids", 0), ("positions", 0), ("slot_mapping", pad * self.kv.block_size),
                           ("context_lens", 1)):
            staged[name].fill(fill)
        staged["token_ids"][decode], staged["token_ids"][real_rows] = inputs.token_ids[rows], inputs.token_ids[lo:hi]
        staged["positions"][decode], staged["positions"][chunk_rows] = inputs.positions[rows], chunk_positions
        staged["slot_mapping"][decode] = inputs.slot_mapping[rows]
        staged["slot_mapping"][real_rows] = inputs.slot_mapping[lo:hi]
        # a chunk row sees the keys up to its own
        staged["context_lens"][decode], staged["context_lens"][chunk_rows] = inputs.context_lens[single], chunk_positions + 1
        tables, width = staged["block_tables"], inputs.block_tables.shape[1]
        tables.fill(pad)
        tables[decode, :width], tables[chunk_rows, :width] = inputs.block_tables[single], inputs.block_tables[k]
        wanted = len(inputs.logits_rows)
        logit_rows = np.arange(n, dtype=np.int64)
        if wanted > n:                                      # the chunk samples: its last row, in the turn's order
            logit_rows = np.insert(logit_rows, k, size + real - 1)
        put(staged["rows"], logit_rows, 0)
        bucket.inputs.upload()
        return self._replay(bucket)[:wanted]

    def run(self, inputs: BatchInputs, tokens_from=None):
        """Logits [n, vocab] (device, float32) of a decode-only turn of n requests. tokens_from:
        (rows, device ids, index) when rows' token ids are ids[index] (batch.feed_tokens)."""
        n = len(inputs.context_lens)
        return self._run_bucket(self._bucket_for(n), inputs, tokens_from)[:n]

    def run_greedy(self, inputs: BatchInputs, tokens_from=None):
        """run's logits and the first maximum of each of their rows (int64 [n] on the device, valid
        until the bucket's next replay: every reader is queued on the stream before it), for a
        turn whose every row is greedy: the bucket's pick graph behind its model graph."""
        n = len(inputs.context_lens)
        bucket = self._bucket_for(n)
        logits = self._run_bucket(bucket, inputs, tokens_from)
        if bucket.pick is None:
            ids = self._pick(bucket, logits)        # eagerly (a CPU device)
        else:
            bucket.pick.launch(self.xp.cuda.get_current_stream())
            ids = bucket.greedy_ids
        return logits[:n], ids[:n]

    def _bucket_for(self, n: int) -> _Bucket:
        return self.buckets[min(b for b in self.buckets if b >= n)]

    def _run_bucket(self, bucket: _Bucket, inputs: BatchInputs, tokens_from):
        n = len(inputs.context_lens)
        pad = self.kv.scratch_block
        staged = bucket.inputs.stage()
        tables = staged["block_tables"]
        tables.fill(pad)
        tables[:n, :inputs.block_tables.shape[1]] = inputs.block_tables
        put(staged["token_ids"], inputs.token_ids, 0)
        put(staged["positions"], inputs.positions, 0)
        put(staged["slot_mapping"], inputs.slot_mapping, pad * self.kv.block_size)
        put(staged["context_lens"], inputs.context_lens, 1)
        bucket.inputs.upload()
        if tokens_from is not None:   # after the upload, which would overwrite them
            feed_tokens(self.xp, bucket.token_ids, tokens_from)
        return self._replay(bucket)

    def _replay(self, bucket: _Bucket):
        """The bucket's logits for the inputs just uploaded: its graph replayed (eagerly on a CPU)."""
        if bucket.graph is None:
            return self._forward(bucket)
        bucket.graph.launch(self.xp.cuda.get_current_stream())
        return bucket.logits
