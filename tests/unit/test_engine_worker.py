"""The device thread around the engine, in process on a CPU device: a turn that raises fails only
its own requests and the thread serves on; Forward and Generate both run as scheduled requests."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from neuron.device import DeviceSpec
from neuron.engine.core import Caller
from neuron.engine.request import Request
from neuron.generation import ErrorEvent, FinishEvent
from neuron.sampling import SamplingConfig
from neuron.shard import LoadRequest
from neuron.worker import DeviceWorker, ForwardJob, GenerateJob
from tests.helpers import MODELS, REFERENCE, EngineEvents, load_fixture_shard


@pytest.fixture
def worker():
    w = DeviceWorker(DeviceSpec("cpu", "cpu", 0), 1 << 30)
    w.start()
    yield w
    w.stop()


def generate(worker, handle, shard, rid, prompt, n=32) -> EngineEvents:
    events = EngineEvents()
    request = Request(rid, prompt, SamplingConfig(max_tokens=n, ignore_eos=True), shard.kv.max_context)
    worker.submit(GenerateJob(handle, request, Caller(emit=events))).result(10)
    return events


def test_a_turn_that_raises_fails_its_requests_and_the_worker_serves_on(worker):
    ref = np.load(REFERENCE / "llama2.npz")
    prompt, expected = ref["prompt_ids"].tolist(), ref["greedy_ids"].tolist()
    shard = load_fixture_shard(worker, 7)
    runner, real_launch = shard.engine.runner, shard.engine.runner.launch
    calls = []

    def broken_once(plan, feed=None):
        calls.append(plan)
        if len(calls) == 1:
            raise RuntimeError("a bug in one turn")
        return real_launch(plan, feed)

    runner.launch = broken_once
    first = generate(worker, 7, shard, "first", prompt)
    assert first.done.wait(10)
    assert isinstance(first.end, ErrorEvent) and "a bug in one turn" in str(first.end.error)
    second = generate(worker, 7, shard, "second", prompt)
    logits = worker.submit(ForwardJob(7, prompt, all_positions=True)).result(10)
    assert second.done.wait(30) and isinstance(second.end, FinishEvent)
    assert second.tokens == expected
    assert float(np.linalg.norm(logits - ref["logits_all"]) / np.linalg.norm(ref["logits_all"])) < 1e-4
    deadline = time.monotonic() + 10
    while shard.engine.stats.running and time.monotonic() < deadline:  # refreshed at the end of the turn
        time.sleep(0.01)
    assert shard.engine.stats.running == 0 and shard.engine.stats.kv.blocks_used == 0


def test_the_load_time_warm_up_leaves_no_trace_and_the_tokens_unchanged():
    from neuron.device import CpuBackend
    from neuron.shard import load_shard

    ref = np.load(REFERENCE / "llama2.npz")
    shard = load_shard(CpuBackend(DeviceSpec("cpu", "cpu", 0), 1 << 30),
                       LoadRequest(MODELS / "llama2", "llama2", max_context=256), 1, lambda p: None, threading.Event())
    engine = shard.engine
    assert engine.warm_up(200) > 0
    stats = engine.stats
    assert (stats.running, stats.waiting, stats.kv.blocks_used, stats.kv.blocks_cached) == (0, 0, 0, 0)
    assert (stats.kv.queries, stats.kv.hits) == (0, 0)
    events = EngineEvents()
    prompt = ref["prompt_ids"].tolist()
    engine.add(Request("after", prompt, SamplingConfig(max_tokens=len(ref["greedy_ids"]), ignore_eos=True), 256),
               Caller(emit=events))
    while engine.has_work():
        engine.step()
    assert isinstance(events.end, FinishEvent) and events.tokens == ref["greedy_ids"].tolist()


def test_no_warm_up_when_the_waiting_queue_takes_nothing():
    from neuron.device import CpuBackend
    from neuron.engine.settings import EngineSettings
    from neuron.shard import load_shard

    shard = load_shard(CpuBackend(DeviceSpec("cpu", "cpu", 0), 1 << 30),
                       LoadRequest(MODELS / "llama2", "llama2", max_context=64), 1, lambda p: None, threading.Event(),
                       settings=EngineSettings(max_waiting=0))
    assert shard.engine.warm_up(32) == 0.0 and not shard.engine.has_work()
