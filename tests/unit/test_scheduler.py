"""The scheduler: budgets, chunked prefill, preemption and resume, aborts, prefix hits, the waiting
bound, finish reasons, and a randomized run checked every turn."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from common.errors import InvalidArgument, ResourceExhausted
from neuron.engine.kv_blocks import KVBlockManager
from neuron.engine.plan import RunnerOutput, SchedulerOutput
from neuron.engine.request import Request, RequestStatus
from neuron.engine.scheduler import Scheduler
from neuron.sampling import SamplingConfig

BS = 4


def make_request(request_id: str, prompt, max_tokens: int = 8, max_context: int = 1024, **kwargs) -> Request:
    sampling_keys = {"stop_token_ids", "ignore_eos"}
    sampling = SamplingConfig(max_tokens=max_tokens, **{k: v for k, v in kwargs.items() if k in sampling_keys})
    return Request(request_id=request_id, prompt_ids=list(prompt), sampling=sampling, max_context=max_context,
                   **{k: v for k, v in kwargs.items() if k not in sampling_keys})


def make_scheduler(num_blocks: int = 64, prefix_caching: bool = True, **kwargs) -> Scheduler:
    return Scheduler(KVBlockManager(num_blocks, BS, enable_prefix_caching=prefix_caching), **kwargs)


def sample_all(plan: SchedulerOutput, token: int = 7) -> RunnerOutput:
    return RunnerOutput(sampled={c.request.request_id: token for c in plan.chunks
                                 if c.sample and not c.request.want_logits})


def turn(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    return plan, scheduler.update(plan, sample_all(plan, token))


def shape(plan: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(c.request.request_id, c.start, len(c.token_ids), c.sample) for c in plan.chunks]


def test_a_turn_stays_within_the_token_budget_and_the_sequence_cap():
    scheduler = make_scheduler(max_batched_tokens=10, max_seqs=3)
    for i in range(5):
        scheduler.add(make_request(f"r{i}", range(4), ignore_eos=True))
    plan = scheduler.schedule()
    assert shape(plan) == [("r0", 0, 4, True), ("r1", 0, 4, True), ("r2", 0, 2, False)]
    assert plan.num_tokens == 10
    scheduler.update(plan, sample_all(plan))
    plan = scheduler.schedule()                                # r3, r4 wait: three run, 6 tokens of budget unused
    assert shape(plan) == [("r0", 4, 1, True), ("r1", 4, 1, True), ("r2", 2, 2, True)]
    assert scheduler.num_running == 3 and scheduler.num_waiting == 2


def test_a_long_prompt_is_prefilled_in_chunks_across_turns_and_only_the_last_chunk_samples():
    scheduler = make_scheduler(max_batched_tokens=16)
    prompt = list(range(100, 150))
    scheduler.add(make_request("long", prompt, max_tokens=2, ignore_eos=True))
    plans = [turn(scheduler)[0] for _ in range(4)]
    assert [shape(p) for p in plans] == [[("long", 0, 16, False)], [("long", 16, 16, False)],
                                         [("long", 32, 16, False)], [("long", 48, 2, True)]]
    assert [t for p in plans for t in p.chunks[0].token_ids] == prompt
    request = scheduler.get("long")
    assert request.output_ids == [7] and request.num_computed_tokens == 50
    assert len(plans[-1].chunks[0].block_ids) * BS >= 50
    plan, updates = turn(scheduler, token=8)
    assert shape(plan) == [("long", 50, 1, True)] and plan.chunks[0].token_ids == [7]
    assert updates[0].finished and request.output_ids == [7, 8]


def test_running_requests_decode_before_a_new_prompt_is_prefilled():
    scheduler = make_scheduler(max_batched_tokens=8)
    scheduler.add(make_request("old", range(3), ignore_eos=True))
    turn(scheduler)
    scheduler.add(make_request("new", range(20), ignore_eos=True))
    plan, _ = turn(scheduler)
    assert shape(plan) == [("old", 3, 1, True), ("new", 0, 7, False)]


def test_when_blocks_run_out_the_newest_request_is_preempted_and_later_recomputes_prompt_and_output():
    scheduler = make_scheduler(num_blocks=4, prefix_caching=False, max_batched_tokens=64)
    scheduler.add(make_request("old", range(6), max_tokens=10, ignore_eos=True))    # 2 blocks
    scheduler.add(make_request("new", range(10, 16), max_tokens=10, ignore_eos=True))
    tokens = iter(range(1000, 2000))

    def step():
        plan = scheduler.schedule()
        out = RunnerOutput(sampled={c.request.request_id: next(tokens) for c in plan.chunks if c.sample})
        scheduler.update(plan, out)
        return plan

    step()                                                     # both prefill: 6 + 6 tokens, 4 blocks
    scheduler.add(make_request("late", range(2), max_tokens=1))  # no block left: it waits
    step()                                                     # decode to 7 + 7 tokens
    step()                                                     # decode to 8 + 8 tokens: the pool is full
    plan = step()                                              # old needs a 3rd block: new goes
    assert plan.preempted == ["new"]
    assert shape(plan) == [("old", 8, 1, True)]
    new = scheduler.get("new")
    assert new.status is RequestStatus.WAITING and new.block_ids == [] and new.num_computed_tokens == 0
    assert scheduler.num_waiting == 2
    output_before = list(new.output_ids)
    assert len(output_before) == 3
    old = scheduler.get("old")
    while not old.is_finished:
        # late would fit the block old leaves free, but new waits in front of it
        assert "late" not in [c.request.request_id for c in step().chunks]
    plan = step()                                              # old's blocks are back: new resumes
    assert shape(plan) == [("new", 0, 9, True), ("late", 0, 2, True)]
    assert plan.chunks[0].token_ids == list(range(10, 16)) + output_before
    while not new.is_finished:
        step()
    assert new.output_ids[:3] == output_before and len(new.output_ids) == 10
    assert scheduler.block_manager.num_free_blocks == 4


def test_a_preempted_request_resumes_from_its_own_blocks_still_in_the_prefix_cache():
    scheduler = make_scheduler(num_blocks=4, max_batched_tokens=64)
    scheduler.add(make_request("old", range(6), max_tokens=4, ignore_eos=True))         # 2 blocks
    scheduler.add(make_request("new", range(10, 18), max_tokens=9, ignore_eos=True))    # 2 full blocks
    turn(scheduler)                                            # the pool is full
    plan, _ = turn(scheduler)                                  # new's 9th token needs a 5th block
    assert plan.preempted == ["new"] and shape(plan) == [("old", 6, 1, True)]
    old, new = scheduler.get("old"), scheduler.get("new")
    while not old.is_finished:                                 # old takes one of new's freed blocks
        turn(scheduler)
    plan, _ = turn(scheduler)
    assert shape(plan) == [("new", 4, 5, True)]                # block 0 was still cached: a hit
    assert plan.chunks[0].token_ids == new.all_token_ids[4:9]


def test_aborting_a_waiting_request_finishes_it_at_the_next_turn():
    scheduler = make_scheduler(max_batched_tokens=4)
    scheduler.add(make_request("first", range(4), ignore_eos=True))
    scheduler.add(make_request("second", range(4), ignore_eos=True))
    turn(scheduler)
    scheduler.abort("second")
    scheduler.abort("nobody")                                  # unknown ids are ignored
    second = scheduler.get("second")
    assert second.status is RequestStatus.WAITING
    plan, _ = turn(scheduler)
    assert plan.finished == ["second"] and shape(plan) == [("first", 4, 1, True)]
    assert second.finish_reason == "abort" and second.is_finished
    assert scheduler.get("second") is None and scheduler.num_waiting == 0


def test_aborting_a_running_request_frees_its_blocks():
    scheduler = make_scheduler(num_blocks=16)
    scheduler.add(make_request("r", range(10), ignore_eos=True))
    turn(scheduler)
    assert scheduler.block_manager.num_free_blocks == 13
    request = scheduler.get("r")
    scheduler.abort("r", "error", "deadline")
    scheduler.abort("r")                                       # the first abort's reasons stand
    plan, updates = turn(scheduler)
    assert plan.finished == ["r"] and plan.chunks == [] and updates == []
    assert (request.finish_reason, request.stop_reason) == ("error", "deadline")
    assert scheduler.block_manager.num_free_blocks == 16 and not scheduler.has_work()


def test_a_token_sampled_for_a_request_aborted_during_the_turn_is_dropped():
    scheduler = make_scheduler()
    scheduler.add(make_request("r", range(5), ignore_eos=True))
    scheduler.add(make_request("s", range(5), ignore_eos=True))
    plan = scheduler.schedule()
    scheduler.abort("r")                                       # while the runner executes the plan
    updates = scheduler.update(plan, sample_all(plan))
    assert [u.request.request_id for u in updates] == ["s"]
    request = plan.chunks[0].request
    assert request.output_ids == []
    plan = scheduler.schedule()
    assert plan.finished == ["r"] and request.finish_reason == "abort"
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks - 2


def test_a_second_request_with_the_same_prefix_starts_after_the_cached_blocks():
    scheduler = make_scheduler()
    prefix = list(range(100, 112))                             # 3 blocks
    scheduler.add(make_request("a", prefix + [1, 2], ignore_eos=True))
    turn(scheduler)
    scheduler.add(make_request("b", prefix + [3], ignore_eos=True))
    plan, _ = turn(scheduler)
    chunk_b = plan.chunks[1]
    assert (chunk_b.start, chunk_b.token_ids) == (12, [3])
    a, b = scheduler.get("a"), scheduler.get("b")
    assert a.block_ids[:3] == b.block_ids[:3]
    manager = scheduler.block_manager
    assert [manager.ref_count(x) for x in b.block_ids[:3]] == [2, 2, 2]
    scheduler.abort("a")
    turn(scheduler)
    assert [manager.ref_count(x) for x in b.block_ids[:3]] == [1, 1, 1]
    assert manager.stats.hits == 12


def test_with_prefix_caching_off_the_same_prefix_is_computed_again():
    scheduler = make_scheduler(prefix_caching=False)
    prefix = list(range(100, 112))
    scheduler.add(make_request("a", prefix + [1, 2], ignore_eos=True))
    turn(scheduler)
    scheduler.add(make_request("b", prefix + [3], ignore_eos=True))
    plan, _ = turn(scheduler)
    assert shape(plan)[1] == ("b", 0, 13, True)
    assert scheduler.block_manager.stats.hits == 0


def test_beyond_the_waiting_bound_add_raises_resource_exhausted_and_loses_nothing():
    scheduler = make_scheduler(max_waiting=3)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", range(4), max_tokens=2, ignore_eos=True))
    with pytest.raises(ResourceExhausted, match="3 requests are already waiting"):
        scheduler.add(make_request("extra", range(4)))
    assert scheduler.get("extra") is None and scheduler.num_waiting == 3
    finished = []
    while scheduler.has_work():
        finished += turn(scheduler)[0].finished
    assert sorted(finished) == ["r0", "r1", "r2"]
    scheduler.add(make_request("extra", range(4), max_tokens=1))   # room again


def test_a_request_that_could_never_fit_or_reuses_an_id_is_refused():
    scheduler = make_scheduler(num_blocks=4)
    with pytest.raises(InvalidArgument, match="KV cache holds 16"):
        scheduler.add(make_request("big", range(12), max_tokens=8))
    scheduler.add(make_request("fits", range(12), max_tokens=8, max_context=16))
    with pytest.raises(InvalidArgument, match="already in use"):
        scheduler.add(make_request("fits", range(2)))
    assert scheduler.num_waiting == 1


@pytest.mark.parametrize("kwargs, tokens, reason", [
    (dict(stop_token_ids=frozenset({9}), eos_ids=frozenset({9})), [5, 9], ("stop", "stop_token:9")),
    (dict(eos_ids=frozenset({2})), [5, 2], ("stop", "eos")),
    (dict(eos_ids=frozenset({2}), ignore_eos=True, max_tokens=3), [2, 2, 2], ("length", "max_tokens")),
    (dict(max_tokens=2), [5, 6], ("length", "max_tokens")),
    (dict(max_context=6), [5, 6], ("length", "context")),
])
def test_finish_reasons(kwargs, tokens, reason):
    scheduler = make_scheduler()
    request = make_request("r", range(4), **{"max_tokens": 8, **kwargs})
    scheduler.add(request)
    updates = []
    for token in tokens:
        assert not request.is_finished
        updates += turn(scheduler, token)[1]
    assert request.is_finished and (request.finish_reason, request.stop_reason) == reason
    assert request.output_ids == tokens
    assert [u.finished for u in updates] == [False] * (len(tokens) - 1) + [True]
    assert [t for u in updates for t in u.new_token_ids] == tokens
    assert scheduler.block_manager.num_free_blocks == 64 and scheduler.num_running == 0


def test_a_scoring_request_returns_its_logits_and_samples_nothing():
    scheduler = make_scheduler(max_batched_tokens=4)
    request = make_request("score", range(10), want_logits=True)
    scheduler.add(request)
    logits = np.ones((1, 5), np.float32)
    updates = []
    while not request.is_finished:
        plan = scheduler.schedule()
        assert [c.num_logit_rows for c in plan.chunks] == [1 if plan.chunks[0].sample else 0]
        out = RunnerOutput(logits={"score": logits} if plan.chunks[0].sample else {})
        updates += scheduler.update(plan, out)
    assert len(updates) == 1 and updates[0].logits is logits and updates[0].finished
    assert (request.finish_reason, request.stop_reason) == ("stop", "scored")
    assert request.output_ids == []


def test_scoring_every_position_gathers_the_rows_of_every_chunk():
    scheduler = make_scheduler(max_batched_tokens=4)
    request = make_request("score", range(10), want_logits=True, all_positions=True)
    scheduler.add(request)
    updates = []
    while not request.is_finished:
        plan = scheduler.schedule()
        chunk = plan.chunks[0]
        assert chunk.num_logit_rows == len(chunk.token_ids)
        rows = np.arange(chunk.start, chunk.start + len(chunk.token_ids), dtype=np.float32)[:, None]
        updates += scheduler.update(plan, RunnerOutput(logits={"score": rows}))
    assert updates[0].logits[:, 0].tolist() == list(range(10))


# -- randomized -----------------------------------------------------------------------------------

class SimulatedKV:
    """A runner that writes each scheduled token id into its KV slot and checks that every earlier
    position already holds the right token: block tables and prefix hits must point at real KV."""

    def __init__(self, num_blocks: int, rng: random.Random):
        self.slots = [None] * (num_blocks * BS)
        self.rng = rng

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        sampled = {}
        for chunk in plan.chunks:
            request, table = chunk.request, chunk.block_ids
            known = request.all_token_ids
            assert chunk.token_ids == known[chunk.start:chunk.start + len(chunk.token_ids)]
            for position in range(chunk.start):
                assert self.slots[table[position // BS] * BS + position % BS] == known[position]
            for offset, token in enumerate(chunk.token_ids):
                position = chunk.start + offset
                self.slots[table[position // BS] * BS + position % BS] = token
            if chunk.sample:
                sampled[request.request_id] = self.rng.randrange(20)
        return RunnerOutput(sampled=sampled)


def check_invariants(scheduler: Scheduler, plan: SchedulerOutput, live: dict[str, Request]) -> None:
    manager = scheduler.block_manager
    assert plan.num_tokens <= scheduler.max_batched_tokens
    assert len(plan.chunks) <= scheduler.max_seqs and scheduler.num_running <= scheduler.max_seqs
    ids = [c.request.request_id for c in plan.chunks]
    assert len(ids) == len(set(ids))
    for chunk in plan.chunks:
        assert chunk.token_ids and len(chunk.block_ids) * BS >= chunk.start + len(chunk.token_ids)
        assert chunk.sample == (chunk.start + len(chunk.token_ids) == chunk.request.num_tokens)
    holders: Counter[int] = Counter()
    for request in live.values():
        assert len(request.block_ids) == len(set(request.block_ids))
        if request.status is RequestStatus.WAITING:
            assert request.block_ids == [] and request.num_computed_tokens == 0
        else:
            assert len(request.block_ids) * BS >= request.num_computed_tokens
        holders.update(request.block_ids)
    for block_id in range(manager.num_blocks):
        assert manager.ref_count(block_id) == holders[block_id]
        if holders[block_id] > 1:
            assert manager.is_cached(block_id)
    assert manager.num_free_blocks == manager.num_blocks - len(holders)


def test_random_arrivals_aborts_and_preemptions_keep_every_invariant_and_lose_no_request():
    rng = random.Random(1234)
    num_blocks = 40
    scheduler = make_scheduler(num_blocks=num_blocks, max_batched_tokens=24, max_seqs=6, max_waiting=12)
    runner = SimulatedKV(num_blocks, rng)
    prefixes = [[rng.randrange(20) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    added: dict[str, Request] = {}
    finished_ids: list[str] = []
    finished_updates: Counter[str] = Counter()
    refused = preemptions = 0
    for turn_index in range(3000):
        arriving = turn_index < 2700
        for _ in range(rng.choice([0, 0, 0, 1, 2]) if arriving else 0):
            prompt = rng.choice(prefixes) + [rng.randrange(20) for _ in range(rng.randrange(1, 30))]
            request = make_request(f"q{len(added)}", prompt, max_tokens=rng.randrange(1, 25),
                                   max_context=rng.choice([64, 200]), eos_ids=frozenset({0}),
                                   ignore_eos=rng.random() < 0.5, stop_token_ids=frozenset({1}),
                                   want_logits=rng.random() < 0.05)
            try:
                scheduler.add(request)
            except ResourceExhausted:
                refused += 1
                continue
            added[request.request_id] = request
        live = {i: r for i, r in added.items() if not r.is_finished}
        if live and rng.random() < 0.05:
            scheduler.abort(rng.choice(list(live)))
        plan = scheduler.schedule()
        live = {i: r for i, r in added.items() if not r.is_finished}
        check_invariants(scheduler, plan, live)
        preemptions += len(plan.preempted)
        finished_ids += plan.finished
        out = runner.execute(plan)
        if live and rng.random() < 0.02:
            scheduler.abort(rng.choice(list(live)))        # aborted while "the runner" ran
        for update in scheduler.update(plan, out):
            assert not update.request.finish_reason == "abort"
            if update.finished:
                finished_updates[update.request.request_id] += 1
    while scheduler.has_work():
        plan = scheduler.schedule()
        finished_ids += plan.finished
        assert plan.is_empty
    assert preemptions > 20 and refused > 0 and len(added) > 500       # the run exercised what it claims to
    manager = scheduler.block_manager
    assert manager.num_free_blocks == num_blocks
    assert all(manager.ref_count(b) == 0 for b in range(num_blocks))
    assert sorted(finished_ids) == sorted(added)                       # every request left exactly once
    for request_id, request in added.items():
        assert request.is_finished and request.block_ids == []
        if request.finish_reason == "abort":
            assert finished_updates[request_id] == 0
        else:
            assert finished_updates[request_id] == 1
            assert len(request.output_ids) <= request.sampling.max_tokens
    assert manager.stats.hits > 0


def test_finish_all_ends_every_request_frees_every_block_and_announces_the_ids():
    scheduler = make_scheduler(num_blocks=16, max_batched_tokens=8)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", range(6), ignore_eos=True))
    turn(scheduler)                                            # r0 runs, r1 half prefilled, r2 waits
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    requests = scheduler.finish_all("error", "device failed")
    assert sorted(r.request_id for r in requests) == ["r0", "r1", "r2"]
    assert all((r.finish_reason, r.stop_reason) == ("error", "device failed") for r in requests)
    assert scheduler.block_manager.num_free_blocks == 16
    assert scheduler.has_work()                                # the ids still go out in one plan
    plan = scheduler.schedule()
    assert plan.is_empty and sorted(plan.finished) == ["r0", "r1", "r2"]
    assert not scheduler.has_work()


def test_stats_report_queues_blocks_and_prefix_hits():
    scheduler = make_scheduler(num_blocks=16, max_seqs=1)
    scheduler.add(make_request("a", range(9), ignore_eos=True))
    scheduler.add(make_request("b", range(9), ignore_eos=True))
    turn(scheduler)
    stats = scheduler.stats()
    assert (stats.running, stats.waiting) == (1, 1)
    assert (stats.kv.blocks_total, stats.kv.blocks_used, stats.kv.blocks_cached) == (16, 3, 2)
    scheduler.abort("a")
    turn(scheduler)                                            # b starts from a's two cached blocks
    assert scheduler.stats().kv.hits == 8


def test_while_others_decode_a_long_prompt_is_computed_in_capped_chunks():
    scheduler = make_scheduler(max_batched_tokens=64, max_prefill_chunk=8)
    scheduler.add(make_request("d", range(4), max_tokens=100, ignore_eos=True))
    turn(scheduler)                                            # d's prompt: nobody decodes yet, no cap
    scheduler.add(make_request("long", range(100, 140), ignore_eos=True))  # shares no block with d
    starts = []
    for _ in range(5):
        plan, _ = turn(scheduler)
        assert ("d", plan.chunks[0].start, 1, True) == shape(plan)[0]  # d gets its token every turn
        starts += [(c.start, len(c.token_ids)) for c in plan.chunks if c.request.request_id == "long"]
    assert starts == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 8)]


def test_without_decoding_requests_a_prompt_takes_the_whole_budget():
    scheduler = make_scheduler(max_batched_tokens=32, max_prefill_chunk=8)
    scheduler.add(make_request("long", range(40), ignore_eos=True))
    plan, _ = turn(scheduler)
    assert shape(plan) == [("long", 0, 32, False)]
