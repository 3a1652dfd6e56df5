"""ModelRunner: runs one turn's plan on the shard's device.

`execute(plan)`: the plan becomes BatchInputs (host), the followers of a TP leader are sent the same
inputs, the arrays are uploaded, the model runs once over every scheduled token, and the batched
sampler picks the next token of every sampling request. Only ids (and a scoring request's logits)
come back to the host. `follow(inputs)` is a follower rank's turn: the same model pass, no sampling.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from neuron.engine.kv_cache import PagedKvCache
from neuron.engine.plan import RunnerOutput, SchedulerOutput
from neuron.layers.attention import AttentionMetadata, DecodeBatch

from .batch import BatchInputs, build_batch
from .cuda_graphs import DecodeGraphs
from .sampler import RowSampler, SampleRow, sample_rows


def to_host(array) -> np.ndarray:
    """A device array's copy on the host (a NumPy array is already there)."""
    return array if isinstance(array, np.ndarray) else array.get()


class ModelRunner:
    """`announce(inputs)`, on a TP leader, hands the turn to every follower before it runs;
    `bound()`, on a TP rank, waits (bounded by the step deadline) for the turn's collectives."""

    def __init__(self, model, kv: PagedKvCache, vocab_size: int,
                 announce: Callable[[BatchInputs], None] | None = None, bound: Callable[[], None] | None = None):
        self.model, self.kv, self.vocab_size = model, kv, vocab_size
        self.xp = model.xp
        self.announce, self.bound = announce, bound
        self.graphs: DecodeGraphs | None = None   # decode turns that fit a captured bucket replay its graph

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        if plan.is_empty:
            return RunnerOutput()
        inputs, spans = build_batch(plan, self.kv.block_size)
        if self.announce is not None:
            self.announce(inputs.for_follower())
        logits = self._run(inputs)
        samples = [s for s in spans if not s.chunk.request.want_logits]
        ids = sample_rows(self.xp, logits, [self._sample_row(span) for span in samples])
        sampled = {span.chunk.request.request_id: token for span, token in zip(samples, ids)}
        scoring = {s.chunk.request.request_id: s for s in spans if s.chunk.request.want_logits}
        out_logits = {rid: np.ascontiguousarray(to_host(logits[s.lo:s.hi]), dtype=np.float32)
                      for rid, s in scoring.items()}
        return RunnerOutput(sampled=sampled, logits=out_logits)

    def _sample_row(self, span) -> SampleRow:
        request = span.chunk.request
        if request.sampler_state is None:
            request.sampler_state = RowSampler.create(request.sampling, self.vocab_size)
        # The prompt + output history only feeds the repetition penalty: not copied each turn without one.
        history = request.all_token_ids if request.sampling.repetition_penalty != 1.0 else []
        return SampleRow(request.sampler_state, span.lo, history)

    def follow(self, inputs: BatchInputs) -> None:
        self._run(inputs)

    def _run(self, inputs: BatchInputs):
        if self.graphs is not None and self.graphs.can_run(inputs):
            logits = self.graphs.run(inputs)
            if self.bound is not None:
                self.bound()
            return logits if len(inputs.logits_rows) else None  # a follower samples nothing
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
        logits = self.model.forward_batch(xp.asarray(inputs.token_ids), xp.asarray(inputs.positions), meta, self.kv,
                                          rows)
        if self.bound is not None:
            self.bound()  # NCCL is asynchronous: a hung collective must not hang the device thread
        return logits
