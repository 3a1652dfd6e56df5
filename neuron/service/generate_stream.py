"""GenerateStream: many generations over one gRPC call, cortex's path to a neuron.

With one Generate call per request, every sampled token cost a gRPC message and an event-loop
wake-up per request, and on one H200 that per-message work (in the process whose GIL the device
thread shares) capped a neuron near 7,000 tok/s whatever the batch. Here the device thread posts
the events of all the call's generations into one inbox, which wakes the loop once per batch of
posts; each wake-up sends one message with an update for every generation that has news. Each
generation's responses are folded by its own ResponseBuilder, exactly as Generate folds them.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import structlog

from common.errors import ServiceError, Unavailable, status_of
from common.proto.neuron.v1 import neuron_pb2 as pb
from neuron.engine.core import Caller
from neuron.generation import ErrorEvent

from .responses import ResponseBuilder, take_all

log = structlog.get_logger("neuron.server")

DRAIN_CHECK_S = 0.25  # how often an idle stream looks at the server's drain state


@dataclass
class Generation:
    """One Generate request, checked and ready for its device (or running there)."""
    handle: int
    model: str
    builder: ResponseBuilder
    caller: Caller
    worker: object                 # the DeviceWorker of the shard
    job: object                    # the GenerateJob to submit

    async def submit(self) -> None:
        future: Future = self.worker.submit(self.job)
        try:
            await asyncio.wrap_future(future)
        except BaseException:
            self.caller.cancel()
            raise

    def submit_nowait(self, on_error: Callable[[BaseException], None]) -> None:
        """Queue the job without waiting to hear it was queued: only a refusal (a full waiting queue,
        a shard gone) calls `on_error`, on the device thread. Awaiting the queued future cost the
        event loop a wake-up per request, from the device thread between turns, in a burst the
        moment it is launching the turn that serves them."""
        def refused(future: Future) -> None:
            if not future.cancelled() and future.exception() is not None:
                on_error(future.exception())
        self.worker.submit(self.job).add_done_callback(refused)

    def log_done(self, timing: pb.Timing) -> None:
        log.info("generate done", request_id=self.builder.request_id, handle=self.handle, model=self.model,
                 prompt_tokens=self.builder.prompt_tokens, completion_tokens=self.builder.completion_tokens,
                 finish=self.builder.finish.stop_reason, ttft_ms=round(timing.time_to_first_token_ms, 2))


class Inbox:
    """Events posted from any thread, taken on the event loop; one loop wake-up per batch of posts
    (a decode turn's tokens for every generation), not one per post."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[int, object]] = []
        self._wake_pending = False
        self.ready = asyncio.Event()

    def post(self, key: int, event: object) -> None:
        self.post_many([(key, event)])

    def post_many(self, items: list[tuple[int, object]]) -> None:
        """Events under their generations' keys, with one lock and at most one wake-up (the engine
        posts a turn's events for all of this call's generations at once)."""
        with self._lock:
            self._items += items
            if self._wake_pending:
                return
            self._wake_pending = True
        self._loop.call_soon_threadsafe(self.ready.set)  # RuntimeError once the loop is closed

    def wake(self) -> None:
        self._loop.call_soon_threadsafe(self.ready.set)

    def take(self) -> list[tuple[int, object]]:
        self.ready.clear()
        with self._lock:
            items, self._items, self._wake_pending = self._items, [], False
        return items


@dataclass(frozen=True)
class _Starting:
    """In `open` while the generation's request is being checked (its prompt tokenized)."""
    handle: int


class GenerationStream:
    """The server side of one GenerateStream call."""

    def __init__(self, service, metrics=None, drain_message: Callable[[], str] = lambda: ""):
        self.service = service         # NeuronService: prepare_generation
        self.metrics = metrics         # NeuronMetrics or None
        self.drain_message = drain_message  # "" while the server serves
        self.inbox = Inbox(asyncio.get_running_loop())
        self.open: dict[int, Generation | _Starting] = {}
        self._first_token_seen: set[int] = set()
        self._tasks: set[asyncio.Task] = set()
        self._reading = True

    async def serve(self, requests) -> AsyncIterator[pb.GenerateStreamResponse]:
        reader = asyncio.create_task(self._read(requests))
        watch = asyncio.create_task(self._watch_drain())
        try:
            while self._reading or self.open:
                if self.drain_message() and not self.open:
                    return  # the drain waits for this call; new generations go to other nodes
                await self.inbox.ready.wait()
                response = pb.GenerateStreamResponse()
                self._updates(self.inbox.take(), response)
                if response.updates:
                    yield response
        finally:
            reader.cancel()
            watch.cancel()
            for task in self._tasks:
                task.cancel()
            for key in list(self.open):
                self._end(key, "CANCELLED")

    async def _watch_drain(self) -> None:
        """Wake the writer once the server drains, so an idle call ends (a timeout on every wait
        would cost a timer per message)."""
        while not self.drain_message():
            await asyncio.sleep(DRAIN_CHECK_S)
        self.inbox.wake()

    # ------------------------------------------------------------ requests from the caller

    async def _read(self, requests) -> None:
        try:
            async for message in requests:
                if message.cancel:
                    self._end(message.id, "CANCELLED")   # one still starting: _begin sees it gone
                elif message.HasField("start"):
                    self._start(message.id, message.start)
        finally:
            self._reading = False  # the caller closed its side: the open generations still finish
            self.inbox.wake()

    def _start(self, key: int, request: pb.GenerateRequest) -> None:
        if key in self.open:
            self.inbox.post(key, ErrorEvent(ServiceError(f"generation id {key} is already open on this call")))
            return
        self.open[key] = _Starting(request.handle)
        if message := self.drain_message():
            self.inbox.post(key, ErrorEvent(Unavailable(message)))
            return
        task = asyncio.create_task(self._begin(key, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _begin(self, key: int, request: pb.GenerateRequest) -> None:
        try:
            generation = await self.service.prepare_generation(request, Caller(sink=self.inbox, key=key))
            if not isinstance(self.open.get(key), _Starting):
                return  # cancelled while its prompt was being read
            self.open[key] = generation
            generation.submit_nowait(lambda err: self.inbox.post(key, ErrorEvent(err)))
        except Exception as err:  # noqa: BLE001 - becomes the generation's status
            self.inbox.post(key, ErrorEvent(err))

    # ------------------------------------------------------------ updates to the caller

    def _updates(self, items: list[tuple[int, object]], response: pb.GenerateStreamResponse) -> None:
        """Add to `response` an update for every open generation the items have news of (written
        in place: a message built apart and then copied into its place cost three times as much)."""
        events_of: dict[int, list] = {}
        for key, event in items:
            events_of.setdefault(key, []).append(event)
        tokens_of: dict[str, int] = {}
        taking: list[tuple[int, Generation, list]] = []
        for key, events in events_of.items():
            generation = self.open.get(key)
            if generation is None:
                continue  # ended or cancelled: what the device posted since is dropped
            if isinstance(generation, Generation):
                taking.append((key, generation, events))
                continue
            error = next((e.error for e in events if isinstance(e, ErrorEvent)), None)
            if error is not None:  # it failed while starting
                self._failed(response, key, error)

        def message_for(index: int) -> pb.GenerateResponse:
            update = response.updates.add()
            update.id = taking[index][0]
            return update.response

        results = take_all([(generation.builder, events) for _, generation, events in taking], message_for)
        for (key, generation, _), message in zip(taking, results):
            if isinstance(message, Exception):  # the device's or the request's error
                self._failed(response, key, message)
                continue
            if message is None:
                continue
            self._count(key, generation, message, tokens_of)
            if generation.builder.finish is not None:
                generation.log_done(message.timing)
                self._end(key, "OK")
        for model, count in tokens_of.items():
            self.metrics.tokens(model, count)

    def _failed(self, response: pb.GenerateStreamResponse, key: int, error: Exception) -> None:
        code, text = status_of(error, "GenerateStream")
        self._end(key, code.name)
        response.updates.add(id=key, error_code=code.value[0], error_message=text)

    def _count(self, key: int, generation: Generation, message: pb.GenerateResponse, tokens_of: dict) -> None:
        """Note a message's tokens in `tokens_of` (model -> count, added to the metrics once per wake-up)."""
        if self.metrics is None or not message.token_ids:
            return
        if key not in self._first_token_seen:
            self._first_token_seen.add(key)
            self.metrics.tokens(generation.model, 0, time.perf_counter() - generation.builder.started)
        tokens_of[generation.model] = tokens_of.get(generation.model, 0) + len(message.token_ids)

    def _end(self, key: int, code: str) -> None:
        generation = self.open.pop(key, None)
        self._first_token_seen.discard(key)
        if isinstance(generation, Generation):
            generation.caller.cancel()  # no-op when the device finished (a stop string ends it here)
            if self.metrics is not None:
                self.metrics.ended(generation.model, code, generation.builder.prompt_tokens if code == "OK" else 0)
        elif isinstance(generation, _Starting) and self.metrics is not None:
            self.metrics.ended(self.metrics.model_of(generation.handle), code)

