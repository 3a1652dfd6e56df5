"""The scheduler: which requests compute which tokens in the next turn, and what a turn's result does
to them.

There is no prefill or decode phase (see request.py): each turn gives each request some of the tokens
it knows but has no KV for. Per turn:

1. Aborted requests leave (blocks freed, status FINISHED, finish_reason "abort").
2. Running requests, oldest first, each get their remaining tokens (one, when decoding), capped by
   the token budget. When the pool has no block for one, the newest running request is preempted:
   its blocks are freed, its computed tokens forgotten, and it waits at the front of the queue to
   recompute prompt + output later. Preemption takes from the back so the oldest keep making
   progress; a turn that preempted admits nobody.
3. Waiting requests, first come first served, while the budget and max_seqs allow: a first
   scheduling starts with a prefix-cache lookup, and a prompt longer than the budget left gets a
   chunk of it (the rest follows in later turns, as a running request). A waiting request that
   cannot get blocks stops admission for the turn: nobody behind it jumps the queue.

Only a chunk that reaches a request's last known token samples (or, for a scoring request, returns
logits). `update` then advances the computed tokens, registers full blocks in the prefix cache and
appends the sampled tokens, finishing requests that stop.

add() and abort() may be called from any thread; schedule() and update() run on the device thread.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import InvalidArgument, ResourceExhausted

from .kv_blocks import KVBlockManager, KVBlockStats
from .plan import RunnerOutput, ScheduledChunk, SchedulerOutput
from .request import Request, RequestStatus


@dataclass(slots=True)  # one per request per turn
class RequestUpdate:
    """What one turn did to one request, for the output side (detokenize, stop strings, events)."""
    request: Request
    new_token_ids: list[int]
    finished: bool
    logits: Any = None                   # a scoring request's logits: float32 [rows, vocab]


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    kv: KVBlockStats


class Scheduler:
    def __init__(self, block_manager: KVBlockManager, max_batched_tokens: int = 2048, max_seqs: int = 256,
                 max_waiting: int = 1024, max_prefill_chunk: int = 0):
        """max_prefill_chunk: while any request is decoding, a prompt is computed at most this many tokens
        a turn (0: only the token budget bounds it), so a long prompt arriving stretches the running
        streams' turns by a bounded amount instead of one whole budget of prefill."""
        if max_batched_tokens < 1 or max_seqs < 1 or max_waiting < 0:
            raise ValueError(f"max_batched_tokens ({max_batched_tokens}) and max_seqs ({max_seqs}) must be >= 1, "
                             f"max_waiting ({max_waiting}) >= 0")
        self.block_manager = block_manager
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.max_waiting = max_waiting
        self.max_prefill_chunk = max_prefill_chunk
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._requests: dict[str, Request] = {}      # every request not yet finished, by id
        self._aborted: dict[str, tuple[str, str]] = {}  # id -> (finish, stop reason), applied at the next schedule()
        self._finished_ids: list[str] = []           # left since the last schedule(), for the plan
        self._logit_rows: dict[Request, list[Any]] = {}  # an all-positions scoring request's chunks so far
        self._lock = threading.RLock()

    # -- queue ------------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a new request (FCFS). Raises ResourceExhausted when max_waiting requests already wait,
        InvalidArgument when the request could never fit the KV pool; nothing changes then."""
        capacity = self.block_manager.capacity_tokens
        # KV is needed for every token but a generated request's last one, which is never fed back.
        if request.want_logits:
            most_kv = len(request.prompt_ids)
        else:
            most_kv = min(request.max_context, len(request.prompt_ids) + max(request.sampling.max_tokens, 1)) - 1
        with self._lock:
            if request.request_id in self._requests:
                raise InvalidArgument(f"request id {request.request_id!r} is already in use; give each request "
                                      f"its own id")
            if most_kv > capacity:
                raise InvalidArgument(f"request {request.request_id!r} may need KV for {most_kv} tokens but the KV cache "
                                      f"holds {capacity}; shorten the prompt or lower max_tokens")
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(f"{len(self._waiting)} requests are already waiting on this shard (the bound "
                                        f"is {self.max_waiting}); retry later or raise the waiting-queue bound")
            request.status = RequestStatus.WAITING
            self._waiting.append(request)
            self._requests[request.request_id] = request

    def abort(self, request_id: str, finish_reason: str = "abort", stop_reason: str = "abort") -> None:
        """The request leaves at the next schedule() with these reasons (the caller left: "abort";
        a deadline or a failure may say "error"); a token sampled for it meanwhile is dropped.
        Unknown or finished ids are ignored; the first abort of a request decides its reasons."""
        with self._lock:
            if request_id in self._requests:
                self._aborted.setdefault(request_id, (finish_reason, stop_reason))

    def finish_all(self, finish_reason: str, stop_reason: str) -> list[Request]:
        """Finish every request at once (the model is being dropped, or the device failed)."""
        with self._lock:
            requests = list(self._requests.values())
            for request in requests:
                self._finish(request, finish_reason, stop_reason)
            self._aborted.clear()
            return requests

    def get(self, request_id: str) -> Request | None:
        with self._lock:
            return self._requests.get(request_id)

    def has_work(self) -> bool:
        """True while a request waits or runs, or finished ids are still to be announced in a plan."""
        with self._lock:
            return bool(self._waiting or self._running or self._finished_ids)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(running=len(self._running), waiting=len(self._waiting),
                                  kv=self.block_manager.stats)

    # -- a turn -----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        with self._lock:
            self._remove_aborted()
            chunks: list[ScheduledChunk] = []
            budget = self.max_batched_tokens
            decoding = self.max_prefill_chunk > 0 and any(r.output_ids for r in self._running)
            chunk_cap = self.max_prefill_chunk if decoding else budget
            budget, preempted = self._schedule_running(chunks, budget, chunk_cap)
            if not preempted:
                self._schedule_waiting(chunks, budget, chunk_cap)
            return SchedulerOutput(chunks=chunks, preempted=preempted, finished=self._take_finished())

    def schedule_ahead(self, running: SchedulerOutput) -> SchedulerOutput | None:
        """The next turn, planned while `running` (scheduled, not yet updated) is still on the
        device: one more decode token for each of its requests, that token being the one `running`
        samples (`fed_by`: the runner copies it on the device). None, and nothing changes, unless
        `running` is a decode turn of every running request (each chunk one sampled token, no
        scoring, no repetition penalty: it needs the token on the host), nothing waits or was
        aborted, and the blocks are there. A request that `running` brings to max_tokens or to its
        context is left out; one that stops on an EOS or stop id leaves at update(running), and its
        chunk here is computed and dropped (update skips requests no longer running)."""
        with self._lock:
            chunks = running.chunks
            if (self._waiting or self._aborted or not chunks or len(chunks) != len(self._running)
                    or any(c.request is not r for c, r in zip(chunks, self._running))):
                return None
            # The first pass only checks, so a chunk that disqualifies the turn returns None before any
            # block is taken; blocks taken for the chunks before one the pool cannot serve stay (the
            # next turn needs them anyway).
            ahead: list[ScheduledChunk] = []
            fed_by: list[int] = []
            for c in chunks:
                request = c.request
                if (not c.sample or len(c.token_ids) != 1 or request.want_logits
                        or request.sampling.repetition_penalty != 1.0):
                    return None
            for i, c in enumerate(chunks):
                request = c.request
                if (len(request.output_ids) + 1 >= request.sampling.max_tokens
                        or request.num_tokens + 1 >= request.max_context):
                    continue                     # `running`'s token finishes it
                # KV for the token `running` computes and the one it samples (computed here)
                if not self.block_manager.allocate(request, 2):
                    return None
                ahead.append(ScheduledChunk(request=request, token_ids=[0], start=request.num_tokens,
                                            block_ids=request.block_ids, sample=True))
                fed_by.append(i)
            if not ahead:
                return None
            return SchedulerOutput(chunks=ahead, finished=self._take_finished(), fed_by=fed_by)

    def _take_finished(self) -> list[str]:
        """The ids finished since the last plan, for the next plan to announce (once)."""
        finished, self._finished_ids = self._finished_ids, []
        return finished

    def _remove_aborted(self) -> None:
        for request_id, reasons in self._aborted.items():
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, *reasons)
        self._aborted.clear()

    def _schedule_running(self, chunks: list[ScheduledChunk], budget: int, chunk_cap: int) -> tuple[int, list[str]]:
        preempted: list[str] = []
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, chunk_cap)
            if num_new == 0:             # nothing left to compute (cannot happen while it runs)
                index += 1
                continue
            while not self.block_manager.allocate(request, num_new):
                victim = self._running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new))
                budget -= num_new
                index += 1
        return budget, preempted

    def _schedule_waiting(self, chunks: list[ScheduledChunk], budget: int, chunk_cap: int) -> None:
        manager = self.block_manager
        while self._waiting and budget > 0 and len(self._running) < self.max_seqs:
            request = self._waiting[0]
            computed_blocks, num_hit = manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget, chunk_cap)
            if not manager.allocate(request, num_new, computed_blocks):
                break
            self._waiting.popleft()
            request.num_computed_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self._running.append(request)
            chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new
        num_prompt = len(request.prompt_ids)
        if end <= num_prompt:
            token_ids = request.prompt_ids[start:end]
        elif start >= num_prompt:        # decode: skip building all_token_ids
            token_ids = request.output_ids[start - num_prompt:end - num_prompt]
        else:
            token_ids = request.all_token_ids[start:end]
        return ScheduledChunk(request=request, token_ids=token_ids, start=start,
                              block_ids=request.block_ids, sample=end == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        self._logit_rows.pop(request, None)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self._waiting.appendleft(request)

    def _finish(self, request: Request, finish_reason: str, stop_reason: str) -> None:
        self.block_manager.free(request)
        self._logit_rows.pop(request, None)
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = finish_reason
        request.stop_reason = stop_reason
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)

    # -- a turn's result --------------------------------------------------------------------------

    def update(self, plan: SchedulerOutput, out: RunnerOutput) -> list[RequestUpdate]:
        updates: list[RequestUpdate] = []
        with self._lock:
            for chunk in plan.chunks:
                request = chunk.request
                if request.status is not RequestStatus.RUNNING or request.request_id in self._aborted:
                    continue                 # aborted meanwhile: it leaves at the next schedule()
                request.num_computed_tokens += len(chunk.token_ids)
                self.block_manager.cache_full_blocks(request)
                if request.want_logits:
                    update = self._scored(chunk, out)
                elif chunk.sample:
                    update = self._sampled(request, out)
                else:
                    update = None
                if update is not None:
                    updates.append(update)
        return updates

    def _sampled(self, request: Request, out: RunnerOutput) -> RequestUpdate:
        try:
            token = out.sampled[request.request_id]
        except KeyError:
            raise RuntimeError(f"the runner sampled no token for request {request.request_id}, "
                               f"whose chunk asked for one") from None
        request.output_ids.append(token)
        reason = self._stop_reason(request, token)
        if reason is not None:
            self._finish(request, *reason)
        return RequestUpdate(request=request, new_token_ids=[token], finished=reason is not None)

    def _scored(self, chunk: ScheduledChunk, out: RunnerOutput) -> RequestUpdate | None:
        request = chunk.request
        if request.all_positions:
            self._logit_rows.setdefault(request, []).append(out.logits.get(request.request_id))
        if not chunk.sample:
            return None
        if request.all_positions:
            rows = self._logit_rows.pop(request)
            logits = rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)
        else:
            logits = out.logits.get(request.request_id)
        self._finish(request, "stop", "scored")
        return RequestUpdate(request=request, new_token_ids=[], finished=True, logits=logits)

    @staticmethod
    def _stop_reason(request: Request, token: int) -> tuple[str, str] | None:
        sampling = request.sampling
        if token in sampling.stop_token_ids:
            return "stop", f"stop_token:{token}"
        if not sampling.ignore_eos and token in request.eos_ids:
            return "stop", "eos"
        if len(request.output_ids) >= sampling.max_tokens:
            return "length", sampling.length_limit  # "context" when the context left bound max_tokens
        if request.num_tokens >= request.max_context:
            return "length", "context"
        return None
