"""cortex's per-node generation stream: updates that queued up for one generation go out as one
response with the same ids, text and final fields; a stream interval holds tokens after the first
until it is reached or the generation ends; what came before a node's error reaches the client."""
from __future__ import annotations

import asyncio

import grpc

from common.errors import ServiceError
from common.proto.neuron.v1 import neuron_pb2 as npb
from cortex.node_streams import NodeStream, merge
from cortex.registry import Registry
from cortex.stream_pacing import StreamPacer


def test_merged_responses_keep_every_id_and_the_text_in_order_and_the_last_ones_finish():
    parts = [npb.GenerateResponse(token_ids=[5], text="he", request_id="r"),
             npb.GenerateResponse(token_ids=[6, 7], text="llo", request_id="r"),
             npb.GenerateResponse(token_ids=[8], text="!", request_id="r", finish_reason=npb.FINISH_REASON_STOP,
                                  stop_reason="eos", usage=npb.Usage(prompt_tokens=3, completion_tokens=4))]
    merged = merge(parts)
    assert list(merged.token_ids) == [5, 6, 7, 8] and merged.text == "hello!"
    assert (merged.finish_reason, merged.stop_reason, merged.usage.completion_tokens) == (
        npb.FINISH_REASON_STOP, "eos", 4)
    assert merged.request_id == "r"
    assert list(parts[-1].token_ids) == [8]  # the inputs are left as they were


def test_a_single_response_passes_unchanged():
    one = npb.GenerateResponse(token_ids=[1, 2], text="ab")
    assert merge([one]) is one


class _FakeCall:
    """A GenerateStream call whose responses the test feeds (one update each) through a queue."""

    def __init__(self):
        self.feed: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        update = await self.feed.get()
        if update is None:
            raise StopAsyncIteration
        return npb.GenerateStreamResponse(updates=[update])


class _FakeStub:
    def __init__(self):
        self.call = _FakeCall()

    def GenerateStream(self, requests):  # noqa: N802 - the gRPC method's name
        return self.call


def _token(i: int, last: bool = False) -> npb.GenerateUpdate:
    response = npb.GenerateResponse(token_ids=[i], text=f"<{i}>")
    if last:
        response.finish_reason = npb.FINISH_REASON_LENGTH
    return npb.GenerateUpdate(id=1, response=response)


async def _run(interval: int | StreamPacer, updates: list, passes: int = 20, before=None):
    """What the client of generation 1 receives while `updates` come from the node one per `passes`
    passes of the event loop (enough for each to reach the client: no clock involved): each
    message's ids, and the error that ended it (None if it finished). `interval`: a fixed one, or
    the pacer to read; `before(i)`, if given, runs before update i is fed."""
    pacer = interval if isinstance(interval, StreamPacer) else StreamPacer(interval, interval)
    stub = _FakeStub()
    stream = NodeStream("n1", stub, Registry())
    received, error = [], None

    async def client():
        nonlocal error
        try:
            async for message in stream.generate(npb.GenerateRequest(), None, pacer):
                received.append(list(message.token_ids))
        except ServiceError as err:
            error = err

    task = asyncio.create_task(client())
    for i, update in enumerate(updates):
        for _ in range(passes):
            await asyncio.sleep(0)
        if before is not None:
            before(i)
        stub.call.feed.put_nowait(update)
    await asyncio.wait_for(task, 5)
    stream.close()
    stub.call.feed.put_nowait(None)
    return received, error


def test_interval_one_sends_each_token_as_it_comes():
    received, error = asyncio.run(_run(1, [_token(i, last=i == 5) for i in range(1, 6)]))
    assert received == [[1], [2], [3], [4], [5]] and error is None


def test_a_stream_interval_sends_the_first_token_at_once_then_holds_until_n_or_the_end():
    received, error = asyncio.run(_run(3, [_token(i, last=i == 9) for i in range(1, 10)]))
    assert received == [[1], [2, 3, 4], [5, 6, 7], [8, 9]] and error is None


def test_the_pacers_interval_is_read_again_before_each_message():
    pacer = StreamPacer(1, 4)

    def load(i: int) -> None:
        if i == 3:
            pacer.interval = 3     # cortex became saturated after the third token
        if i == 9:
            pacer.interval = 1     # and had room again before the tenth

    received, error = asyncio.run(_run(pacer, [_token(i, last=i == 11) for i in range(1, 12)], before=load))
    assert received == [[1], [2], [3], [4, 5, 6], [7, 8, 9], [10], [11]] and error is None


def test_tokens_held_before_a_node_error_reach_the_client_before_the_error():
    failed = npb.GenerateUpdate(id=1, error_code=grpc.StatusCode.INTERNAL.value[0], error_message="device lost")
    received, error = asyncio.run(_run(4, [_token(1), _token(2), _token(3), failed]))
    assert received == [[1], [2, 3]]
    assert error is not None and error.code == grpc.StatusCode.INTERNAL and "device lost" in str(error)
