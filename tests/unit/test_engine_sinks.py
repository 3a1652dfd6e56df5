"""ShardEngine's event sinks: a GenerateStream call's generations get their turn's events in one
post_many (not one post per event), each generation's events as its own emit would get them, and
a sink whose loop has closed cancels its callers."""
from __future__ import annotations

import numpy as np

from neuron.engine.core import Caller, ShardEngine
from neuron.engine.kv_blocks import KVBlockManager
from neuron.engine.request import Request
from neuron.engine.scheduler import Scheduler
from neuron.generation import FinishEvent, TokenEvent
from neuron.runner.model_runner import ModelRunner
from neuron.sampling import SamplingConfig

VOCAB, BS = 16, 4


class RowLogits:
    """A model whose greedy token for a row is (the row's position + 3) mod VOCAB."""
    xp = np
    decode_attention = None

    def forward_batch(self, token_ids, positions, meta, kv, rows):
        if rows is None:
            return None
        logits = np.zeros((len(rows), VOCAB), dtype=np.float32)
        logits[np.arange(len(rows)), (np.asarray(positions)[rows] + 3) % VOCAB] = 1.0
        return logits


class BlockSize:
    block_size = BS


class Sink:
    def __init__(self, closed: bool = False):
        self.calls: list[list] = []
        self.closed = closed

    def post_many(self, items):
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.calls.append(list(items))


def engine(async_scheduling: bool) -> ShardEngine:
    scheduler = Scheduler(KVBlockManager(64, BS), max_batched_tokens=64, max_seqs=8)
    return ShardEngine(scheduler, ModelRunner(RowLogits(), BlockSize(), VOCAB), async_scheduling=async_scheduling)


def requests():
    return [Request(f"r{i}", list(range(1, 2 + i)), SamplingConfig(max_tokens=3 + i, ignore_eos=True), 64)
            for i in range(3)]


def run(shard: ShardEngine, callers: list[Caller]) -> None:
    for request, caller in zip(requests(), callers):
        shard.add(request, caller)
    for _ in range(50):
        if not shard.has_work():
            break
        shard.step()
    assert not shard.has_work()


def test_a_sink_gets_one_post_a_turn_with_what_each_emit_would_get():
    for async_scheduling in (False, True):
        alone = [[] for _ in range(3)]
        run(engine(async_scheduling), [Caller(emit=events.append) for events in alone])
        sink = Sink()
        run(engine(async_scheduling), [Caller(sink=sink, key=10 + i) for i in range(3)])
        together = [[event for call in sink.calls for key, event in call if key == 10 + i] for i in range(3)]
        for i in range(3):
            assert [type(e) for e in together[i]] == [type(e) for e in alone[i]]
            assert [e.token_id for e in together[i] if isinstance(e, TokenEvent)] == \
                   [e.token_id for e in alone[i] if isinstance(e, TokenEvent)]
            assert len([e for e in together[i] if isinstance(e, TokenEvent)]) == 3 + i
            assert isinstance(together[i][-1], FinishEvent)
        # one call per turn that had news, holding the events of every generation that turn
        assert len(sink.calls) == 5 and len(sink.calls[0]) == 3


def test_a_closed_sink_cancels_its_callers_and_their_requests_end():
    shard = engine(True)
    sink = Sink(closed=True)
    callers = [Caller(sink=sink, key=i) for i in range(3)]
    other = []
    bystander = Caller(emit=other.append)
    for request, caller in zip(requests(), callers):
        shard.add(request, caller)
    shard.add(Request("other", [5, 6], SamplingConfig(max_tokens=6, ignore_eos=True), 64), bystander)
    shard.step()
    assert all(c.cancelled for c in callers) and not bystander.cancelled
    for _ in range(20):
        if not shard.has_work():
            break
        shard.step()
    assert not shard.has_work()
    assert len([e for e in other if isinstance(e, TokenEvent)]) == 6    # the other caller was served to its end
    assert shard.scheduler.block_manager.num_free_blocks == 64
