"""The Generate stream's messages from the device's events, with fake event sources that deliver
tokens one at a time or merged in every grouping: usage, timing, finish reason and request id
must not depend on the grouping."""
from __future__ import annotations

import asyncio

import pytest

from common.errors import Unavailable
from common.proto.neuron.v1 import neuron_pb2 as pb
from neuron.generation import ErrorEvent, FinishEvent, TokenEvent
from neuron.service.responses import ResponseBuilder, responses
from neuron.tokenizer import TextStream, Tokenizer
from tests.unit.test_tokenizer import TOKENIZER_CONFIG, byte_level_backend, compositions

STARTED = 100.0


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(byte_level_backend(), TOKENIZER_CONFIG, {})


def token_events(ids: list[int], first: float = 101.0, step: float = 0.25) -> list[TokenEvent]:
    return [TokenEvent(token_id, sampled_at=first + i * step) for i, token_id in enumerate(ids)]


def run(events: list, sizes: list[int], tokenizer: Tokenizer | None = None, stop: list[str] = (),
        request_id: str = "req-1") -> list[pb.GenerateResponse]:
    """Feed the events to a ResponseBuilder in groups of the given sizes, as they would arrive merged."""
    text = TextStream(tokenizer, list(stop)) if tokenizer else None
    builder = ResponseBuilder(request_id, prompt_tokens=7, text=text, started=STARTED)
    messages, start = [], 0
    for size in sizes:
        message = builder.take(events[start:start + size])
        start += size
        if message is not None:
            messages.append(message)
        if builder.finish is not None:
            break
    assert builder.finish is not None, "the events ended without a finished output"
    return messages


def summary(messages: list[pb.GenerateResponse]) -> tuple:
    final = messages[-1]
    ids = [t for m in messages for t in m.token_ids]
    return (ids, "".join(m.text for m in messages), final.finish_reason, final.stop_reason,
            final.usage.completion_tokens, round(final.timing.time_to_first_token_ms, 6),
            round(final.timing.decode_tokens_per_second, 6))


def test_timing_is_per_token_however_tokens_are_merged():
    # Four tokens sampled at 101.0, 101.25, 101.5, 101.75 after a request received at 100.0:
    # TTFT 1000 ms and 3 tokens in 0.75 s, for every way the events could have been merged.
    events = token_events([5, 6, 7, 8]) + [FinishEvent("length", "max_tokens")]
    for sizes in compositions(len(events)):
        assert summary(run(events, sizes)) == ([5, 6, 7, 8], "", pb.FINISH_REASON_LENGTH, "max_tokens", 4,
                                               1000.0, 4.0), sizes


def test_one_token_has_no_decode_rate():
    messages = run(token_events([5]) + [FinishEvent("stop", "eos")], [2])
    assert summary(messages) == ([5], "", pb.FINISH_REASON_STOP, "eos", 1, 1000.0, 0.0)


def test_merged_delivery_through_the_queue():
    # Everything is already waiting when the stream starts: one message carries it all.
    async def collect():
        queue: asyncio.Queue = asyncio.Queue()
        for event in token_events([5, 6, 7]) + [FinishEvent("length", "context"), TokenEvent(9)]:
            queue.put_nowait(event)
        builder = ResponseBuilder("req-1", 3, None, started=STARTED)
        return [m async for m in responses(queue, builder)]

    messages = asyncio.run(collect())
    assert len(messages) == 1
    assert summary(messages) == ([5, 6, 7], "", pb.FINISH_REASON_LENGTH, "context", 3, 1000.0, 4.0)


def test_nothing_after_a_stop_token_is_sent_or_counted():
    events = token_events([5, 6, 2, 11, 12]) + [FinishEvent("length", "max_tokens")]
    events.insert(3, FinishEvent("stop", "stop_token:2"))
    for sizes in compositions(len(events)):
        ids, _, finish, stop_reason, completion, _, rate = summary(run(events, sizes))
        assert (ids, finish, stop_reason, completion, rate) == ([5, 6, 2], pb.FINISH_REASON_STOP,
                                                               "stop_token:2", 3, 4.0), sizes


def test_stop_string_usage_is_the_tokens_up_to_the_stop(tokenizer):
    ids = tokenizer.encode("Hello, world! Hello there", add_special_tokens=False)
    completing = next(k for k in range(len(ids) + 1) if "world" in tokenizer.decode(ids[:k]))
    assert completing < len(ids)
    events = token_events(ids) + [FinishEvent("length", "max_tokens")]
    rate = (completing - 1) / (0.25 * (completing - 1))
    expected = (ids[:completing], "Hello, ", pb.FINISH_REASON_STOP, "stop:world", completing, 1000.0, rate)
    for sizes in compositions(len(events)):
        assert summary(run(events, sizes, tokenizer, stop=["world"])) == expected, sizes


def test_stop_string_found_when_the_stream_finishes(tokenizer):
    # The device stops (max_tokens) inside a character that follows the stop string.
    ids = tokenizer.encode("ab STOP🦄", add_special_tokens=False)[:-1]
    completing = next(k for k in range(len(ids) + 1) if "STOP" in tokenizer.decode(ids[:k]))
    events = token_events(ids) + [FinishEvent("length", "max_tokens")]
    for sizes in compositions(len(events)):
        ids_out, text, finish, stop_reason, completion, _, _ = summary(run(events, sizes, tokenizer, stop=["STOP"]))
        assert (ids_out, text, finish, stop_reason, completion) == (
            ids[:completing], "ab ", pb.FINISH_REASON_STOP, "stop:STOP", completing), sizes


def test_request_id_on_every_message(tokenizer):
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    events = token_events(ids) + [FinishEvent("length", "max_tokens")]
    messages = run(events, [1] * len(events), tokenizer, request_id="abc-123")
    assert len(messages) == len(ids) + 1  # one per token, then the finish
    assert {m.request_id for m in messages} == {"abc-123"}


def test_device_error_is_raised():
    events = token_events([5, 6]) + [ErrorEvent(Unavailable("device lost"))]
    with pytest.raises(Unavailable, match="device lost"):
        run(events, [3])
