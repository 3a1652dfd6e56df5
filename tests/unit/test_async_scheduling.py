"""Async scheduling (ShardEngine(async_scheduling=True)): a decode turn planned and queued while the
one before it still runs, its tokens fed from that turn's samples. On a CPU device the model runs
for real (the fixtures, fp32); the tokens must be those of the engine without it, request by
request, through arrivals, stops, aborts and preemption, and every block must come back."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from neuron.device import CpuBackend, DeviceSpec
from neuron.engine.core import Caller
from neuron.engine.kv_blocks import KVBlockManager
from neuron.engine.plan import RunnerOutput
from neuron.engine.request import Request
from neuron.engine.scheduler import Scheduler
from neuron.engine.settings import EngineSettings
from neuron.generation import FinishEvent
from neuron.sampling import SamplingConfig
from neuron.shard import LoadRequest, load_shard
from tests.helpers import MODELS, REFERENCE, EngineEvents

BS = 4


def decode_turn(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    scheduler.update(plan, RunnerOutput(sampled={c.request.request_id: token for c in plan.chunks if c.sample}))
    return plan


def test_schedule_ahead_plans_one_fed_token_per_decoding_request():
    scheduler = Scheduler(KVBlockManager(64, BS), max_batched_tokens=64)
    a = Request("a", [1, 2, 3], SamplingConfig(max_tokens=10, ignore_eos=True), 64)
    b = Request("b", [4, 5], SamplingConfig(max_tokens=2, ignore_eos=True), 64)   # its next token is its last
    scheduler.add(a)
    scheduler.add(b)
    prompt_plan = scheduler.schedule()
    assert scheduler.schedule_ahead(prompt_plan) is None        # prompt chunks: nothing to feed from
    scheduler.update(prompt_plan, RunnerOutput(sampled={"a": 9, "b": 9}))
    running = scheduler.schedule()                               # one decode token each
    ahead = scheduler.schedule_ahead(running)
    assert [c.request.request_id for c in ahead.chunks] == ["a"] and ahead.fed_by == [0]
    chunk = ahead.chunks[0]
    assert chunk.start == a.num_tokens and chunk.sample          # the position of the token `running` samples
    assert len(chunk.block_ids) * BS >= chunk.start + 1
    scheduler.update(running, RunnerOutput(sampled={"a": 11, "b": 12}))
    assert b.is_finished and b.output_ids == [9, 12]
    scheduler.update(ahead, RunnerOutput(sampled={"a": 13}))
    assert a.output_ids == [9, 11, 13] and a.num_computed_tokens == len(a.prompt_ids) + 2


@pytest.mark.parametrize("case", ["waiting", "aborted", "penalty"])
def test_schedule_ahead_declines_what_it_cannot_plan(case):
    scheduler = Scheduler(KVBlockManager(64, BS), max_batched_tokens=64)
    penalty = 1.3 if case == "penalty" else 1.0
    scheduler.add(Request("a", [1, 2, 3], SamplingConfig(max_tokens=10, ignore_eos=True,
                                                         repetition_penalty=penalty), 64))
    decode_turn(scheduler)
    running = scheduler.schedule()
    if case == "waiting":
        scheduler.add(Request("late", [1], SamplingConfig(max_tokens=3), 64))
    if case == "aborted":
        scheduler.abort("a")
    used = scheduler.block_manager.stats.blocks_used
    assert scheduler.schedule_ahead(running) is None
    assert scheduler.block_manager.stats.blocks_used == used


class CountingFeeds:
    """Wraps the runner: how many turns were launched fed from the turn before."""

    def __init__(self, runner):
        self.runner, self.fed, self.preempted = runner, 0, 0

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def launch(self, plan, feed=None):
        self.fed += feed is not None
        self.preempted += len(plan.preempted)
        return self.runner.launch(plan, feed)


def serve(name: str, async_scheduling: bool, num_blocks_cap: int | None = None):
    """Eight requests with different prompts and lengths, three joining later, one aborted after
    five tokens; returns each one's tokens and end, the engine, and the runner's counts (fed
    turns, preemptions). `num_blocks_cap`: the pool is cut to that many free blocks (the rest held
    for good, counted in blocks_used)."""
    ref = np.load(REFERENCE / f"{name}.npz")
    settings = EngineSettings(async_scheduling=async_scheduling, max_seqs=8)
    shard = load_shard(CpuBackend(DeviceSpec("cpu", "cpu", 0), 1 << 30),
                       LoadRequest(MODELS / name, name, max_context=128), 1, lambda p: None, threading.Event(),
                       settings=settings)
    engine = shard.engine
    if num_blocks_cap is not None:                         # a small pool: decode turns preempt
        manager = engine.scheduler.block_manager
        for _ in range(manager.num_free_blocks - num_blocks_cap):
            manager._take_fresh()
    counting = CountingFeeds(engine.runner)
    engine.runner = counting
    long_prompt = ref["long_prompt_ids"].tolist()
    events, callers = {}, {}
    def add(i):
        prompt = long_prompt[: 5 + 7 * i]
        events[i] = EngineEvents()
        callers[i] = Caller(emit=events[i])
        eos = i % 3 == 0                                     # some stop on the model's EOS ids too
        engine.add(Request(f"r{i}", prompt, SamplingConfig(max_tokens=6 + 3 * i, ignore_eos=not eos), 128,
                           eos_ids=frozenset(int(t) for t in ref["greedy_ids"][2:4]) if eos else frozenset()),
                   callers[i])
    for i in range(5):
        add(i)
    turns = 0
    while engine.has_work() or turns < 12:
        engine.step()
        turns += 1
        if turns in (3, 6, 9):
            add(5 + (turns // 3 - 1))
        if len(events[1].tokens) >= 5 and not callers[1].cancelled:
            callers[1].cancel()
    return {i: (e.tokens, e.end) for i, e in events.items()}, engine, counting


@pytest.mark.parametrize("name", ["llama3", "qwen2", "mistral"])
def test_async_scheduling_gives_every_request_the_tokens_it_gets_without(name):
    want, _, off = serve(name, async_scheduling=False)
    got, engine, on = serve(name, async_scheduling=True)
    assert off.fed == 0 and on.fed > 10                      # turns really were queued ahead
    for i in want:
        assert got[i] == want[i], f"request {i}"
        if i == 1:                                           # its caller left: no end event, no more tokens
            assert got[1][1] is None and 5 <= len(got[1][0]) < 9
        else:
            assert isinstance(got[i][1], FinishEvent)
    stats = engine.scheduler.block_manager.stats
    assert not engine.has_work() and stats.blocks_used == 0


def test_async_scheduling_through_preemption_keeps_the_tokens():
    want, _, off = serve("llama3", async_scheduling=False, num_blocks_cap=8)
    got, engine, on = serve("llama3", async_scheduling=True, num_blocks_cap=8)
    assert off.preempted > 0 and on.preempted > 0 and on.fed > 0
    assert got == want
    stats = engine.scheduler.block_manager.stats
    assert stats.blocks_used == stats.blocks_total - 8        # only the blocks held back
