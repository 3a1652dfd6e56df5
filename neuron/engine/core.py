"""ShardEngine: one shard's serving engine, driven by its device thread one turn at a time.

A turn is `plan = scheduler.schedule()` -> `launched = runner.launch(plan)` -> `out =
runner.finish(launched)` -> `scheduler.update(plan, out)` (with async scheduling the next decode
turn is planned and launched before `finish`), then every request's caller is told what happened:
a Generate caller gets TokenEvent / FinishEvent / ErrorEvent through its `emit` (or, for a
GenerateStream's generations, in one post_many per turn to the call's sink), a Forward caller's
future gets the logits. A caller that went away (its `cancelled` is set, or its future was
cancelled) is aborted at the next turn.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import structlog

from common.errors import ResourceExhausted
from neuron.collectives import CollectiveError
from neuron.generation import ErrorEvent, FinishEvent, TokenEvent
from neuron.sampling import SamplingConfig

from .request import Request
from .scheduler import RequestUpdate, Scheduler, SchedulerStats

log = structlog.get_logger(__name__)


def settle(future: Future, result: Any = None, error: Exception | None = None) -> None:
    """Complete a future unless its caller already gave up on it (cancelled, or a deadline passed):
    completing a cancelled future raises InvalidStateError on the device thread."""
    try:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled by the caller's thread between the check and the set
        pass


class EventSink(Protocol):
    """Where several callers' events go together (a GenerateStream call's inbox): one call a turn
    for all of them instead of one per event."""

    def post_many(self, items: list[tuple[int, object]]) -> None: ...


@dataclass
class Caller:
    """Who waits for a request: `emit` (Generate, thread-safe), `sink` (events posted under `key`,
    with the turn's events of the sink's other callers), or `future` (Forward)."""
    emit: Callable[[object], None] | None = None
    future: Future | None = None
    sink: EventSink | None = None
    key: int = 0
    cancelled: bool = False          # set from any thread (a bool: read by the device thread every turn)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def streams(self) -> bool:
        return self.emit is not None or self.sink is not None

    @property
    def gone(self) -> bool:
        return self.cancelled or (self.future is not None and self.future.done())

    def post(self, event) -> None:
        try:
            if self.sink is not None:
                self.sink.post_many([(self.key, event)])
            else:
                self.emit(event)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
            self.cancelled = True

    def fail(self, error: Exception) -> None:
        if self.streams:
            self.post(ErrorEvent(error))
        elif self.future is not None:
            settle(self.future, error=error)


class ShardEngine:
    def __init__(self, scheduler: Scheduler, runner, lockstep: bool = False, async_scheduling: bool = False):
        """lockstep: a TP rank, whose every turn must run on all ranks; a turn that fails there
        leaves the ranks' collectives out of step, so it fails the group (CollectiveError).
        async_scheduling: while a decode turn runs on the device, the next one is planned and
        queued behind it with its tokens fed on the device (Scheduler.schedule_ahead), so the
        host's update and events of a turn overlap the device's next turn (not on TP ranks,
        whose followers need the tokens on the host)."""
        self.scheduler, self.runner, self.lockstep = scheduler, runner, lockstep
        self.async_scheduling = async_scheduling and not lockstep
        if self.async_scheduling:
            runner.queue_copies = True
        self._callers: dict[str, Caller] = {}
        self._ahead = None          # (plan, LaunchedTurn) queued behind the turn being finished
        self.stats: SchedulerStats = scheduler.stats()   # refreshed after every turn, read by Describe

    def add(self, request: Request, caller: Caller) -> None:
        """Raises ResourceExhausted (waiting queue full) or InvalidArgument (can never fit)."""
        self.scheduler.add(request)
        self._callers[request.request_id] = caller
        self.stats = self.scheduler.stats()

    def has_work(self) -> bool:
        return self._ahead is not None or self.scheduler.has_work()

    def step(self, ahead: bool = True) -> None:
        """One turn. A CollectiveError propagates (the TP group is broken: the worker fails the
        shard); any other failure fails this turn's requests and the engine serves on (on a TP
        rank it is a CollectiveError too). With async scheduling (and `ahead`) the next turn may
        be left queued on the device when this returns; `drain` finishes it."""
        for request_id, caller in list(self._callers.items()):
            if caller.gone:
                self.scheduler.abort(request_id)
        plans = []
        try:
            if self._ahead is not None:
                plan, launched = self._ahead
                self._ahead = None
                plans.append(plan)
            else:
                plan = self._forget_finished(self.scheduler.schedule())
                plans.append(plan)
                launched = self.runner.launch(plan)
            if ahead and self.async_scheduling:
                next_plan = self.scheduler.schedule_ahead(plan)
                if next_plan is not None:
                    plans.append(self._forget_finished(next_plan))
                    self._ahead = (next_plan, self.runner.launch(next_plan, feed=launched))
            out = self.runner.finish(launched)
            sampled_at = time.perf_counter()
            updates = self.scheduler.update(plan, out)
        except CollectiveError:
            raise
        except Exception as err:  # noqa: BLE001 - a bad turn fails its requests, not the device thread
            if self.lockstep:
                raise CollectiveError(f"a turn failed on the leader: {err!r}") from err
            self._ahead = None
            log.exception("engine turn failed", requests=sum(len(p.chunks) for p in plans))
            for failed in plans:
                for chunk in failed.chunks:
                    self._fail(chunk.request.request_id, err)
            return
        self._post_all(updates, sampled_at)
        self.stats = self.scheduler.stats()

    def drain(self) -> None:
        """Finish the turn left queued on the device, if any (before anything that changes the
        shard between turns)."""
        while self._ahead is not None:
            self.step(ahead=False)

    def _forget_finished(self, plan):
        """The plan, after dropping the callers of the requests it announces as finished."""
        for request_id in plan.finished:
            self._callers.pop(request_id, None)
        return plan

    def _fail(self, request_id: str, err: Exception) -> None:
        self.scheduler.abort(request_id)
        caller = self._callers.pop(request_id, None)
        if caller is not None:
            caller.fail(err)

    def _post_all(self, updates: list[RequestUpdate], sampled_at: float) -> None:
        """Every update's events to its caller; a sink's come in one post_many for the turn."""
        posts: dict[int, tuple[EventSink, list]] = {}   # id(sink) -> (sink, its callers' events)
        for update in updates:
            self._post(update, sampled_at, posts)
        for sink, items in posts.values():
            try:
                sink.post_many(items)
            except RuntimeError:  # the sink's event loop is closed: nobody is listening any more
                for caller in self._callers.values():
                    if caller.sink is sink:
                        caller.cancelled = True

    def _post(self, update: RequestUpdate, sampled_at: float, posts: dict) -> None:
        request = update.request
        caller = self._callers.get(request.request_id)
        if caller is None:
            return
        sink = caller.sink
        if sink is not None:      # a GenerateStream generation (cortex's path): the turn's one post_many
            entry = posts.get(id(sink))
            if entry is None:
                entry = posts[id(sink)] = (sink, [])
            key = caller.key
            entry[1].extend([(key, TokenEvent(token, sampled_at)) for token in update.new_token_ids])
            if update.finished:
                entry[1].append((key, FinishEvent(request.finish_reason, request.stop_reason)))
        elif caller.emit is not None:
            for token in update.new_token_ids:
                caller.post(TokenEvent(token, sampled_at))
            if update.finished:
                caller.post(FinishEvent(request.finish_reason, request.stop_reason))
        elif update.finished and caller.future is not None:
            logits = np.asarray(update.logits, dtype=np.float32)
            settle(caller.future, logits if request.all_positions else logits[0])
        if update.finished:
            self._callers.pop(request.request_id, None)

    def warm_up(self, num_tokens: int, burst: int = 4) -> float:
        """Run one prompt of `num_tokens` through a whole turn, then `burst` short requests arriving
        together and one more while they decode, and forget them all; returns the seconds. The
        first turn of a shape compiles kernels (NVRTC, CuPy's elementwise and concatenate
        kernels): 2.5-3.3 s on the H200 for the first 2,048-token turn, which the first user's
        time to first token paid before this ran at load; after that turn alone, the first
        workload of several streams still paid ~0.3 s once (bench/NOTES.md, session 20), which the
        burst's turns (several prompts in one turn, decode turns fed on the device, a prompt
        beside decoding rows, requests finishing) are for. The prompts' blocks leave the prefix
        cache and their lookups leave the hit counters."""
        started = time.perf_counter()
        events: list = []
        caller = Caller(emit=events.append)

        def add(name: str, prompt_tokens: int, max_tokens: int) -> bool:
            try:
                self.add(Request(name, [0] * prompt_tokens, SamplingConfig(max_tokens=max_tokens, ignore_eos=True),
                                 prompt_tokens + max_tokens), caller)
            except ResourceExhausted as err:  # --max-waiting 0 queues nothing: no warm-up, the load goes on
                log.warning("no warm-up turn", reason=str(err))
                return False
            return True

        def run() -> None:
            while self.has_work():
                self.step()

        if not add("warm-up", num_tokens, 1):
            return 0.0
        run()
        short = 16   # the burst's prompts: 14-16 tokens, each with at most 6 + burst outputs
        if burst and num_tokens >= 2 * short and all(add(f"warm-up-{i}", short - i % 3, 6 + i) for i in range(burst)):
            self.step()
            if add("warm-up-late", short, 4):
                run()
        run()
        self.reset_prefix_cache()
        self.scheduler.block_manager.reset_counters()
        errors = [event.error for event in events if isinstance(event, ErrorEvent)]
        if errors:
            raise errors[0]
        self.stats = self.scheduler.stats()
        return time.perf_counter() - started

    def fail_all(self, error: Exception) -> None:
        """Every request ends with `error` (the model is dropped, its group broke, the neuron stops).
        A turn left queued on the device is dropped unfinished: its blocks are freed, and whatever
        reuses them is queued behind it."""
        self._ahead = None
        self.scheduler.finish_all("error", str(error))
        callers, self._callers = self._callers, {}
        for caller in callers.values():
            caller.fail(error)
        self.stats = self.scheduler.stats()

    def reset_prefix_cache(self) -> int:
        self.drain()
        return self.scheduler.block_manager.reset_prefix_cache()
