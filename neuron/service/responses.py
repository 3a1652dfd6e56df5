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
from typing import AsyncIterator, Callable

from common.proto.neuron.v1 import neuron_pb2 as pb
from neuron.generation import ErrorEvent, FinishEvent, TokenEvent
from neuron.tokenizer import StreamDelta, TextStream, push_many

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
        result = take_all([(self, events)], lambda _: pb.GenerateResponse())[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _fold(self, events: list, ids: list[int], delta: StreamDelta | None,
              message_for: Callable[[int], pb.GenerateResponse], index: int) -> pb.GenerateResponse | None:
        """take(), given the ids of the leading token events (`ids`, their text already pushed);
        the message, `message_for(index)`, is asked for only when there is something to write into it."""
        tokens = len(ids)
        stop = delta.stop if delta is not None else None
        kept = delta.tokens if stop is not None else tokens   # a token completing a stop string is kept
        if kept:
            if self.first_sampled_at is None:
                self.first_sampled_at = events[0].sampled_at
            self.completion_tokens += kept
            self.last_sampled_at = events[kept - 1].sampled_at
        text = delta.text if delta is not None else ""
        if stop is not None:
            ids = ids[:kept]
            self.finish = FinishEvent("stop", f"stop:{stop}")
        elif tokens < len(events):   # a finish or an error after the tokens (nothing comes after them)
            for event in events[tokens:]:
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, FinishEvent):
                    text += self._end(event)
                    break
        if not ids and self.finish is None:
            return None
        return self._write(message_for(index), ids, text)

    def _end(self, event: FinishEvent) -> str:
        """The device finished: release the held text, which may still hold a stop string."""
        self.finish = event
        if self.text is None:
            return ""
        tail = self.text.finish()
        if tail.stop is not None:
            self.finish = FinishEvent("stop", f"stop:{tail.stop}")
        return tail.text

    def _write(self, message: pb.GenerateResponse, ids: list[int], text: str) -> pb.GenerateResponse:
        """Fill `message` in place (building a message and then copying it into its place in a
        GenerateStreamResponse cost three times as much CPU, once per token per stream)."""
        message.token_ids.extend(ids)
        message.text = text
        message.request_id = self.request_id
        if self.finish is None:
            return message
        now = time.perf_counter()
        first = self.first_sampled_at if self.first_sampled_at is not None else now
        last = self.last_sampled_at if self.last_sampled_at is not None else now
        decode_seconds = last - first
        message.finish_reason = FINISH[self.finish.reason]
        message.stop_reason = self.finish.stop_reason
        message.usage.prompt_tokens = self.prompt_tokens
        message.usage.completion_tokens = self.completion_tokens
        message.timing.time_to_first_token_ms = (first - self.started) * 1e3
        message.timing.total_ms = (now - self.started) * 1e3
        message.timing.decode_tokens_per_second = ((self.completion_tokens - 1) / decode_seconds
                                                   if decode_seconds > 0 else 0.0)
        return message


def _leading_tokens(events: list) -> int:
    """How many of the events come before the first that is not a token (a finish or an error)."""
    for k, event in enumerate(events):
        if not isinstance(event, TokenEvent):
            return k
    return len(events)


def take_all(batches: list[tuple[ResponseBuilder, list]],
             message_for: Callable[[int], pb.GenerateResponse]) -> list[pb.GenerateResponse | None | Exception]:
    """ResponseBuilder.take for several requests' events at once, with the text of their tokens
    decoded together (push_many: one tokenizer call per round, without the GIL): each entry is
    the message take would return, written into `message_for(index)`, None when there is nothing
    to send, or the error take would raise. A request's messages do not depend on what it is
    taken with."""
    ids = [[e.token_id for e in events[:_leading_tokens(events)]] for _, events in batches]
    texts = [i for i, (builder, _) in enumerate(batches)
             if builder.text is not None and ids[i] and builder.finish is None]
    pushed = push_many([(batches[i][0].text, ids[i]) for i in texts])
    deltas = dict(zip(texts, pushed))
    results: list[pb.GenerateResponse | None | Exception] = []
    for i, (builder, events) in enumerate(batches):
        try:
            results.append(None if builder.finish is not None else
                           builder._fold(events, ids[i], deltas.get(i), message_for, i))
        except Exception as err:  # noqa: BLE001 - the device's error, for the caller to raise
            results.append(err)
    return results


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
