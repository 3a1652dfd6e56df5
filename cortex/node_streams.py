"""Generations to a neuron over one GenerateStream call per node instead of one Generate call each.

A decode turn of 64 requests then reaches cortex as one message, not 64: on one H200 the per-message
work of gRPC in Python, once in the neuron and once here, capped a single neuron near 7,000 tok/s
(bench/NOTES.md, session 6). Each generation keeps its own queue; updates that queue up while the
client's stream is busy go out merged into one message (its tokens and text joined), so a loaded
cortex sends fewer, larger messages instead of falling behind. With a stream interval of n a
generation's tokens after its first are also held until n have come (or it finishes): each client
message costs cortex a socket write and gRPC's per-message work, most of its CPU under load
(bench/NOTES.md, session 11), so n > 1 trades n - 1 turns of latency on later tokens for
throughput, as vLLM's and SGLang's --stream-interval do. The interval is the StreamPacer's
(stream_pacing.py): --stream-interval, raised up to --max-stream-interval while cortex's event
loop is saturated, read again before each message.

Failure semantics are Generate's: a neuron error ends that generation with the neuron's status
(the node named); the call breaking, or the node marked DOWN, ends every generation on it with
UNAVAILABLE; a client that goes away or runs out of time cancels its generation on the neuron.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator

import grpc
import structlog

from common.errors import STATUS_CODES, DeadlineExceeded, ServiceError, Unavailable, from_rpc_error, status_error
from common.proto.neuron.v1 import neuron_pb2 as npb

from .registry import Registry
from .stream_pacing import StreamPacer

log = structlog.get_logger(__name__)


def merge(updates: list[npb.GenerateResponse]) -> npb.GenerateResponse:
    """One response for consecutive ones of a generation: ids and text joined, the rest (finish,
    usage, timing) from the last."""
    if len(updates) == 1:
        return updates[0]
    merged = npb.GenerateResponse()
    merged.CopyFrom(updates[-1])
    del merged.token_ids[:]
    for u in updates:
        merged.token_ids.extend(u.token_ids)
    merged.text = "".join(u.text for u in updates)
    return merged


class NodeStream:
    """One open GenerateStream call to a node, shared by every generation cortex routes there."""

    def __init__(self, node: str, stub, registry: Registry):
        self.node, self.stub, self.registry = node, stub, registry
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._queues: dict[int, asyncio.Queue] = {}
        self.closed = False
        self._call = stub.GenerateStream(self._requests())
        self._tracked = registry.track(node, self._call)  # cut (cancelled) when the node goes DOWN
        self._reader = asyncio.create_task(self._read(), name=f"generate-stream-{node}")

    async def _requests(self):
        while True:
            message = await self._outbox.get()
            if message is None:
                return
            yield message

    async def _read(self) -> None:
        error: ServiceError = Unavailable(f"node {self.node}: its generation stream ended (the neuron is shutting "
                                          "down); retry")
        try:
            async for message in self._call:
                for update in message.updates:
                    queue = self._queues.get(update.id)
                    if queue is not None:
                        queue.put_nowait(update)
        except grpc.aio.AioRpcError as err:
            if self._tracked.cut:
                error = Unavailable(self._tracked.cut)
            elif err.code() == grpc.StatusCode.CANCELLED:
                error = Unavailable(f"node {self.node}: the generation stream was cancelled; retry")
            else:
                error = from_rpc_error(err, f"node {self.node}: ")
        except asyncio.CancelledError:
            error = Unavailable(f"node {self.node}: cortex closed the generation stream; retry")
        finally:
            self.closed = True
            self.registry.untrack(self.node, self._tracked)
            for queue in self._queues.values():
                queue.put_nowait(error)

    async def generate(self, request: npb.GenerateRequest, timeout: float | None,
                       pacer: StreamPacer | None = None) -> AsyncIterator[npb.GenerateResponse]:
        """The responses of one generation, as Generate would stream them (merged when they queue up,
        and after the first token held until the pacer's interval of tokens have come; no pacer:
        each as it comes). Raises ServiceError: the
        neuron's status, UNAVAILABLE, or DEADLINE_EXCEEDED after `timeout`; what came before the
        error is sent first."""
        key, queue = next(self._ids), asyncio.Queue()
        self._queues[key] = queue
        self._outbox.put_nowait(npb.GenerateStreamRequest(id=key, start=request))
        # The deadline is one timer per generation that queues the error (a wait_for per message
        # cost a task and a timer each: a tenth of cortex's time under load).
        expired = DeadlineExceeded("Deadline Exceeded: the request's deadline passed before the generation finished")
        timer = None if timeout is None else asyncio.get_running_loop().call_later(
            max(0.0, timeout), queue.put_nowait, expired)
        finished, sent_tokens, held, held_tokens = False, 0, [], 0
        try:
            while not finished:
                items = [await queue.get()]
                # One pass of the loop before draining: the reader may bring the next turn's update
                # meanwhile. Without it the reader and the writers took turns in FIFO order, so a
                # saturated cortex still sent every token as its own message (1.00 token a message;
                # with it 1.4-1.5 and 17-20% more tokens a second, bench/cortex_cost_bench.py).
                await asyncio.sleep(0)
                while not queue.empty():
                    items.append(queue.get_nowait())
                error = None
                for item in items:
                    if isinstance(item, ServiceError):
                        error = item
                    elif item.error_code:
                        error = status_error(STATUS_CODES.get(item.error_code, grpc.StatusCode.UNKNOWN),
                                             f"node {self.node}: {item.error_message}")
                    if error is not None:
                        break
                    held.append(item.response)
                    held_tokens += len(item.response.token_ids)
                    finished = finished or bool(item.response.finish_reason)
                interval = pacer.interval if pacer is not None else 1
                if held and (finished or error is not None or held_tokens >= interval or not sent_tokens):
                    sent_tokens += held_tokens
                    response, held, held_tokens = merge(held), [], 0
                    yield response
                if error is not None:
                    raise error
        finally:
            if timer is not None:
                timer.cancel()
            del self._queues[key]
            if not finished and not self.closed:
                self._outbox.put_nowait(npb.GenerateStreamRequest(id=key, cancel=True))

    def close(self) -> None:
        self._outbox.put_nowait(None)


class NodeStreams:
    """The open NodeStream of each node, opened on first use and again after it breaks."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._streams: dict[str, NodeStream] = {}

    def get(self, node: str, stub) -> NodeStream:
        stream = self._streams.get(node)
        if stream is None or stream.closed or stream.stub is not stub:
            if stream is not None and not stream.closed:
                stream.close()
            stream = self._streams[node] = NodeStream(node, stub, self.registry)
        return stream

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
