"""ModelRunner: runs one turn's plan on the shard's device.

`execute(plan)` = `finish(launch(plan))`. `launch`: the plan becomes BatchInputs (host), the
followers of a TP leader are sent the same inputs, the arrays are uploaded, the model runs once over
every scheduled token, and the batched sampler picks the next token of every sampling request, all
queued on the device. `finish`: only ids (and a scoring request's logits) come back to the host.
Between the two, async scheduling launches the next turn fed from this one's ids on the device.
`follow(inputs)` is a follower rank's turn: the same model pass, no sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from neuron.engine.kv_cache import PagedKvCache
from neuron.engine.plan import RunnerOutput, SchedulerOutput
from neuron.layers.attention import AttentionMetadata, DecodeBatch

from .batch import BatchInputs, build_batch, feed_tokens
from .cuda_graphs import DecodeGraphs
from .sampler import RowSampler, SampleRow, greedy_rows, sample_rows_on_device


def to_host(array) -> np.ndarray:
    """A device array's copy on the host (a NumPy array is already there)."""
    return array if isinstance(array, np.ndarray) else array.get()


class IdsCopyBack:
    """The sampled ids' copies into pinned host memory, each queued on the stream right behind the
    sampler with an event recorded after it: `finish` waits for that point of the stream, not for
    a turn queued later (a plain .get() would wait for everything queued before it). The pinned
    buffers and events are reused once `finish` has read them: a fresh pair each turn cost ~46 us
    of the device thread's time at one row on the H200 host (bench/NOTES.md, session 20); a turn
    dropped unfinished keeps its pair, and a new one is made."""

    CAPACITY = 256   # ids a buffer holds at least (a turn samples at most max_seqs rows)

    def __init__(self, xp):
        self.xp = xp
        self._free: list[tuple[np.ndarray, Any]] = []

    def queue(self, ids) -> tuple[np.ndarray, Any, Any]:
        """(the host array the ids will be in, the event after their copy, the buffer to give back
        once read). On a CPU: the ids as they are, no event, no buffer."""
        if isinstance(ids, np.ndarray) or not len(ids):
            return (ids if isinstance(ids, np.ndarray) else np.zeros(0, dtype=np.int64)), None, None
        xp = self.xp
        while self._free and len(self._free[-1][0]) < len(ids):
            self._free.pop()             # too small for this turn: dropped, a larger one is made
        if self._free:
            pair = self._free.pop()
        else:
            import cupyx
            pair = (cupyx.empty_pinned(max(self.CAPACITY, len(ids)), dtype=np.int64), xp.cuda.Event(disable_timing=True))
        buffer, ready = pair
        host = buffer[:len(ids)]
        stream = xp.cuda.get_current_stream()
        runtime = xp.cuda.runtime
        runtime.memcpyAsync(host.ctypes.data, ids.data.ptr, ids.nbytes, runtime.memcpyDeviceToHost, stream.ptr)
        ready.record(stream)
        return host, ready, pair

    def give_back(self, pair) -> None:
        """The buffer and event of a copy whose ids were read: free for a later turn."""
        if pair is not None:
            self._free.append(pair)


@dataclass(slots=True)
class LaunchedTurn:
    """A turn queued on the device: what `finish` needs to bring its results back."""
    plan: SchedulerOutput
    samples: list = field(default_factory=list)   # the sampling chunks, in the order of ids
    ids: Any = None                               # device int64 [len(samples)]
    host_ids: Any = None                          # their copy on the host (pinned), valid once `ready`
    ready: Any = None                             # CUDA event after the copy; None on a CPU
    copy_buffer: Any = None                       # IdsCopyBack's buffer of host_ids, given back once read
    scoring: list = field(default_factory=list)   # RowSpans of the scoring chunks
    logits: Any = None                            # device [R, vocab] float32, kept only for scoring rows


class ModelRunner:
    """`announce(inputs)`, on a TP leader, hands the turn to every follower before it runs;
    `bound()`, on a TP rank, waits (bounded by the step deadline) for the turn's collectives."""

    def __init__(self, model, kv: PagedKvCache, vocab_size: int,
                 announce: Callable[[BatchInputs], None] | None = None, bound: Callable[[], None] | None = None):
        self.model, self.kv, self.vocab_size = model, kv, vocab_size
        self.xp = model.xp
        self.announce, self.bound = announce, bound
        self.graphs: DecodeGraphs | None = None   # decode turns that fit a captured bucket replay its graph
        # ids copied back through a queued copy and an event (IdsCopyBack), for async
        # scheduling: a plain copy would wait for the turn queued behind
        self.queue_copies = False
        self.copies = IdsCopyBack(self.xp)

    def release_graphs(self) -> None:
        """Free the decode graphs and their memory (the shard is going); turns then run eagerly."""
        graphs, self.graphs = self.graphs, None
        if graphs is not None:
            graphs.release()

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        return self.finish(self.launch(plan))

    def launch(self, plan: SchedulerOutput, feed: "LaunchedTurn | None" = None) -> "LaunchedTurn":
        """The turn's work queued on the device, its ids not yet back (on a CPU it has all run).
        `feed`: the turn still running whose sampled ids are this plan's tokens (a plan from
        Scheduler.schedule_ahead: chunk i's one token is feed's sample plan.fed_by[i]); they are
        copied on the device, so this turn can start before the host knows them."""
        if plan.is_empty:
            return LaunchedTurn(plan)
        inputs, rows = build_batch(plan, self.kv.block_size)
        tokens_from = None
        if feed is not None:
            if self.announce is not None:
                raise ValueError("a turn fed on the device cannot be sent to TP followers (their token ids "
                                 "would be placeholders)")
            tokens_from = (inputs.query_start[:-1], feed.ids, np.asarray(plan.fed_by, dtype=np.int64))
        if self.announce is not None:
            self.announce(inputs.for_follower())
        greedy = bool(rows.sampling) and all(c.request.sampling.plain_greedy for c in rows.sampling)
        logits, ids = self._run(inputs, tokens_from, greedy=greedy and not rows.scoring)
        if ids is None:
            ids = self._sample(logits, rows.sampling, rows.sampling_rows, greedy)
        host_ids, ready, buffer = self.copies.queue(ids) if self.queue_copies else (None, None, None)
        return LaunchedTurn(plan, rows.sampling, ids, host_ids, ready, buffer, rows.scoring,
                            logits if rows.scoring else None)

    def finish(self, launched: "LaunchedTurn") -> RunnerOutput:
        """The launched turn's ids (and scoring logits) on the host: waits for the device."""
        if launched.plan.is_empty:
            return RunnerOutput()
        if launched.ready is not None:
            launched.ready.synchronize()   # the ids' copy landed; a turn queued after it may still run
        ids = (launched.host_ids if launched.host_ids is not None else to_host(launched.ids)).tolist()
        self.copies.give_back(launched.copy_buffer)
        sampled = {chunk.request.request_id: token for chunk, token in zip(launched.samples, ids)}
        out_logits = {s.chunk.request.request_id: np.ascontiguousarray(to_host(launched.logits[s.lo:s.hi]),
                                                                       dtype=np.float32)
                      for s in launched.scoring}
        return RunnerOutput(sampled=sampled, logits=out_logits)

    def _sample(self, logits, chunks: list, rows: np.ndarray, greedy: bool):
        """The sampled ids of `chunks` (whose logits are `rows`), on the device; `greedy`: every one
        of them is plain greedy."""
        if not chunks:       # a turn of prompt chunks that end before their prompts: no logits at all
            return self.xp.zeros(0, dtype=self.xp.int64)
        if greedy:
            return greedy_rows(self.xp, logits, rows)   # no per-request sampler state needed
        return sample_rows_on_device(self.xp, logits, [self._sample_row(c, int(row)) for c, row in zip(chunks, rows)])

    def _sample_row(self, chunk, row: int) -> SampleRow:
        request = chunk.request
        if request.sampler_state is None:
            request.sampler_state = RowSampler.create(request.sampling, self.vocab_size)
        # The prompt + output history only feeds the repetition penalty: not copied each turn without one.
        history = request.all_token_ids if request.sampling.repetition_penalty != 1.0 else []
        return SampleRow(request.sampler_state, row, history)

    def follow(self, inputs: BatchInputs) -> None:
        self._run(inputs)

    def _run(self, inputs: BatchInputs, tokens_from=None, greedy: bool = False):
        """(logits, the greedy ids of every logits row when `greedy` and a graph picked them, else
        None). tokens_from: (rows, device ids, index) when rows' token ids are ids[index], on the
        device."""
        if self.graphs is not None and self.graphs.can_run(inputs):
            if greedy and len(inputs.logits_rows):   # then the rows are every row, in order
                logits, ids = self.graphs.run_greedy(inputs, tokens_from)
            else:
                logits, ids = self.graphs.run(inputs, tokens_from), None
            if self.bound is not None:
                self.bound()
            return (logits if len(inputs.logits_rows) else None), ids  # a follower samples nothing
        if self.graphs is not None and tokens_from is None and self.graphs.can_run_mixed(inputs):
            return self.graphs.run_mixed(inputs), None   # decode rows and a prompt's middle chunk (single-device shards)
        xp = self.xp
        decode = None
        if self.model.decode_attention is not None and self.model.decode_attention.prefill_rows:
            decode = DecodeBatch.every_row(xp, inputs.query_start, inputs.positions, inputs.block_tables,
                                           tiled=self.model.decode_attention.tiled)
        elif self.model.decode_attention is not None:
            decode = DecodeBatch.select(xp, inputs.query_start, inputs.context_lens, inputs.block_tables)
        meta = AttentionMetadata(slot_mapping=xp.asarray(inputs.slot_mapping), block_tables=xp.asarray(inputs.block_tables),
                                 query_start=inputs.query_start, context_lens=inputs.context_lens,
                                 block_size=self.kv.block_size, decode=decode)
        rows = xp.asarray(inputs.logits_rows) if len(inputs.logits_rows) else None
        token_ids = xp.asarray(inputs.token_ids)
        if tokens_from is not None:
            feed_tokens(xp, token_ids, tokens_from)
        logits = self.model.forward_batch(token_ids, xp.asarray(inputs.positions), meta, self.kv, rows)
        if self.bound is not None:
            self.bound()  # NCCL is asynchronous: a hung collective must not hang the device thread
        return logits, None
