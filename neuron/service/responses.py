"""The Generate stream: the device's events for one request (tokens, then a finish or an error)
turned into GenerateResponse messages.

Events are taken in the order the device posted them, one at a time, so the output does not
depend on how many arrived together: tokens after a stop string or a finish are dropped, usage
counts exactly the token ids returned, and timing uses when each token was sampled.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from common.proto.neuron.v1 import neuron_pb2 as pb
from neuron.generation import ErrorEvent, FinishEvent, TokenEvent
from neuron.tokenizer import TextStream

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclass
class ResponseBuilder:
    """Folds one request's events into messages: one per batch of events, the last with the finish."""
    request_id: str
    prompt_tokens: int
    text: TextStream | None                  # None: the model has no tokenizer, so no text
    started: float = field(default_factory=time.perf_counter)
    completion_tokens: int = 0
    first_sampled_at: float | None = None
    last_sampled_at: float | None = None
    finish: FinishEvent | None = None        # set once the output is complete

    def take(self, events: list) -> pb.GenerateResponse | None:
        """The message for events that arrived together, or None when they add nothing to send.
        Raises the device's error. Once `finish` is set, the rest of the events are ignored."""
        ids: list[int] = []
        delta = ""
        for event in events:
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, FinishEvent):
                delta += self._end(event)
            else:
                delta += self._token(event, ids)
            if self.finish is not None:
                return self._final(ids, delta)
        return pb.GenerateResponse(token_ids=ids, text=delta, request_id=self.request_id) if ids else None

    def _token(self, event: TokenEvent, ids: list[int]) -> str:
        """Add one sampled token to the output; its text delta. A token that completes a stop
        string is kept (and counted) and finishes the output."""
        delta, stop = "", None
        if self.text is not None:
            delta, stop, _ = self.text.push([event.token_id])
        ids.append(event.token_id)
        self.completion_tokens += 1
        if self.first_sampled_at is None:
            self.first_sampled_at = event.sampled_at
        self.last_sampled_at = event.sampled_at
        if stop is not None:
            self.finish = FinishEvent("stop", f"stop:{stop}")
        return delta

    def _end(self, event: FinishEvent) -> str:
        """The device finished: release the held text, which may still hold a stop string."""
        self.finish = event
        if self.text is None:
            return ""
        tail = self.text.finish()
        if tail.stop is not None:
            self.finish = FinishEvent("stop", f"stop:{tail.stop}")
        return tail.text

    def _final(self, ids: list[int], delta: str) -> pb.GenerateResponse:
        now = time.perf_counter()
        first = self.first_sampled_at if self.first_sampled_at is not None else now
        last = self.last_sampled_at if self.last_sampled_at is not None else now
        decode_seconds = last - first
        rate = (self.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else 0.0
        return pb.GenerateResponse(
            token_ids=ids, text=delta, finish_reason=FINISH[self.finish.reason], stop_reason=self.finish.stop_reason,
            usage=pb.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens),
            timing=pb.Timing(time_to_first_token_ms=(first - self.started) * 1e3, total_ms=(now - self.started) * 1e3,
                             decode_tokens_per_second=rate),
            request_id=self.request_id)


async def responses(events: asyncio.Queue, builder: ResponseBuilder) -> AsyncIterator[pb.GenerateResponse]:
    """Messages for the events the device posts to `events`, until the output is complete.
    Events that are already waiting are merged into one message."""
    while builder.finish is None:
        batch = [await events.get()]
        while not events.empty():
            batch.append(events.get_nowait())
        message = builder.take(batch)
        if message is not None:
            yield message
