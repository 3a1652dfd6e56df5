"""The runner and the batched model pass, in process on CPU fp32, with hand-built plans: a flat
batch of many requests (chunked prefills beside decodes, blocks scattered over the pool) gives each
request the logits and greedy tokens it gets alone, and those of transformers."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from neuron.collectives import SingleRank
from neuron.engine.kv_cache import PagedKvCache
from neuron.engine.plan import ScheduledChunk, SchedulerOutput
from neuron.engine.request import Request
from neuron.kv_cache import KvCache
from neuron.layers import attention
from neuron.loader import Checkpoint
from neuron.model.config import ModelConfig
from neuron.model.llama import LlamaModel
from neuron.model.sharding import TpLayout, parameter_reads
from neuron.runner.batch import build_batch
from neuron.runner.model_runner import ModelRunner
from neuron.runner.sampler import RowSampler, SampleRow, sample_rows
from neuron.sampling import Sampler, SamplingConfig
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE

BLOCK = 4
MAX_CONTEXT = 256


def build(name: str, sliding_window: int | None = None, decode: str = "off"):
    directory = MODELS / name
    config = ModelConfig.from_dir(directory)
    if sliding_window is not None:
        config = dataclasses.replace(config, sliding_window=sliding_window)
    layout = TpLayout.build(config)
    ckpt = Checkpoint(directory)
    params = {}
    for key, reads in parameter_reads(config, layout, "lm_head.weight" in ckpt.tensors).items():
        parts = [ckpt.read(r) for r in reads]
        params[key] = (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.float32)
    model = LlamaModel(config, layout, params, np, SingleRank(), MAX_CONTEXT, fused="off", decode_attention=decode)
    kv = PagedKvCache(np, config.num_layers, 200, BLOCK, layout.local_kv_heads, config.head_dim, np.float32, MAX_CONTEXT)
    return model, kv, config


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


class HandScheduler:
    """Gives each request up to `chunk` uncomputed tokens per turn, blocks from a shuffled pool."""

    def __init__(self, kv: PagedKvCache, chunk: int, seed: int = 0):
        self.free = list(range(kv.num_blocks))
        random.Random(seed).shuffle(self.free)
        self.chunk = chunk

    def plan(self, requests: list[Request]) -> SchedulerOutput:
        chunks = []
        for r in requests:
            known = r.all_token_ids
            n = min(self.chunk, len(known) - r.num_computed_tokens)
            if n <= 0:
                continue
            end = r.num_computed_tokens + n
            while len(r.block_ids) * BLOCK < end:
                r.block_ids.append(self.free.pop())
            chunks.append(ScheduledChunk(r, known[r.num_computed_tokens:end], r.num_computed_tokens, list(r.block_ids),
                                         sample=end == len(known)))
        return SchedulerOutput(chunks)

    @staticmethod
    def update(plan: SchedulerOutput, out) -> None:
        for c in plan.chunks:
            c.request.num_computed_tokens += len(c.token_ids)
            if c.request.request_id in out.sampled:
                c.request.output_ids.append(out.sampled[c.request.request_id])


def request(rid: str, prompt, max_context=MAX_CONTEXT, **sampling) -> Request:
    return Request(rid, [int(t) for t in prompt], SamplingConfig(**sampling), max_context)


def run_to(runner, sched, requests, steps: int, late: dict[int, list[Request]] | None = None):
    """Turns until every request has `steps` output tokens; `late[turn]` join at that turn."""
    active, turn = [], 0
    pending = dict(late or {})
    active.extend(requests)
    while any(len(r.output_ids) < steps for r in active) or pending:
        active.extend(pending.pop(turn, []))
        plan = sched.plan([r for r in active if len(r.output_ids) < steps])
        sched.update(plan, runner.execute(plan))
        turn += 1
    return active


# "numpy": every row through the CUDA-core kernel's mirror; "numpy-tiles": through the tensor-core
# kernel's, prompt chunks in tiles of 16 rows, as the GPU runs them.
@pytest.mark.parametrize("decode", ["off", "numpy", "numpy-tiles"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batched_greedy_tokens_equal_transformers_for_each_request(name, decode):
    ref = np.load(REFERENCE / f"{name}.npz")
    model, kv, config = build(name, decode=decode)
    runner = ModelRunner(model, kv, config.vocab_size)
    prompt, long_prompt = ref["prompt_ids"].tolist(), ref["long_prompt_ids"].tolist()
    # the same prompt three times (two join mid-flight), beside a long prompt prefilled in chunks
    first = [request("a", prompt), request("long", long_prompt)]
    late = {3: [request("b", prompt)], 7: [request("c", prompt)]}
    done = run_to(runner, HandScheduler(kv, chunk=7), first, 32, late)
    for r in done:
        if r.request_id != "long":
            assert r.output_ids == [int(t) for t in ref["greedy_ids"]], r.request_id


@pytest.mark.parametrize("decode", ["off", "numpy", "numpy-tiles"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batched_logits_equal_the_single_sequence_pass(name, decode):
    ref = np.load(REFERENCE / f"{name}.npz")
    model, kv, config = build(name, decode=decode)
    prompt, long_prompt = ref["prompt_ids"].tolist(), ref["long_prompt_ids"].tolist()
    slot_kv = KvCache(np, config.num_layers, 1, model.layout.local_kv_heads, MAX_CONTEXT, config.head_dim, np.float32)
    alone = model.forward(np.asarray(long_prompt, np.int32), 0, slot_kv, 0, all_positions=True)
    scoring = request("score", long_prompt)
    scoring.want_logits = scoring.all_positions = True
    last = request("last", prompt)
    last.want_logits = True
    sched = HandScheduler(kv, chunk=9, seed=3)
    runner = ModelRunner(model, kv, config.vocab_size)
    others = [request(f"g{i}", prompt[: 3 + i]) for i in range(4)]
    rows, last_logits = [], None
    for _ in range(20):
        live = [r for r in [scoring, last, *others] if r.num_computed_tokens < r.num_tokens or r in others]
        plan = sched.plan([r for r in live if len(r.output_ids) < 6])
        out = runner.execute(plan)
        sched.update(plan, out)
        if "score" in out.logits:
            rows.append(out.logits["score"])
        if "last" in out.logits:
            last_logits = out.logits["last"]
    every = np.concatenate(rows)
    assert every.shape == (len(long_prompt), config.vocab_size)
    assert rel(every, alone) < 1e-5
    assert rel(every[-1], ref["long_logits_last"]) < 1e-4
    assert last_logits.shape == (1, config.vocab_size)
    assert rel(last_logits[0], ref["logits_last"]) < 1e-4


def logits_in_chunks_then_rows(model, kv, config, ids, chunk: int, chunked: int, seed: int):
    """Every position's logits of `ids`, scored in turns of `chunk` tokens up to `chunked`, then one
    row a turn (decode rows)."""
    scoring = request("score", ids)
    scoring.want_logits = scoring.all_positions = True
    sched, runner, rows = HandScheduler(kv, chunk=chunk, seed=seed), ModelRunner(model, kv, config.vocab_size), []
    while scoring.num_computed_tokens < len(ids):
        sched.chunk = chunk if scoring.num_computed_tokens < chunked else 1
        plan = sched.plan([scoring])
        out = runner.execute(plan)
        sched.update(plan, out)
        rows.append(out.logits["score"])
    return np.concatenate(rows)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_one_row_turns_through_the_gemv_mirror_give_the_single_sequence_logits(name):
    """A request alone decodes one row a turn: with the GEMV engine's NumPy mirror as the one-row
    ops (norm into the product's input, silu and the residual add into its output), every
    position's logits stay those of the single-sequence pass, and the tokens those of transformers."""
    from neuron.kernels.fused_gemv import NumpyOps

    ref = np.load(REFERENCE / f"{name}.npz")
    model, kv, config = build(name, decode="numpy-tiles")
    model.ops.gemv = NumpyOps("float32")
    ids = ref["long_prompt_ids"][:30].tolist()
    slot_kv = KvCache(np, config.num_layers, 1, model.layout.local_kv_heads, MAX_CONTEXT, config.head_dim, np.float32)
    alone = model.forward(np.asarray(ids, np.int32), 0, slot_kv, 0, all_positions=True)
    assert rel(logits_in_chunks_then_rows(model, kv, config, ids, chunk=5, chunked=10, seed=2), alone) < 1e-5
    runner = ModelRunner(model, kv, config.vocab_size)
    done = run_to(runner, HandScheduler(kv, chunk=7, seed=4), [request("a", ref["prompt_ids"].tolist())], 32)
    assert done[0].output_ids == [int(t) for t in ref["greedy_ids"]]


def test_tiles_cut_into_launches_give_the_same_logits(monkeypatch):
    """A long prompt's tiles spread over several launches (the partials' cap) attend as in one."""
    ref = np.load(REFERENCE / "llama3.npz")
    ids = ref["long_prompt_ids"].tolist()

    def score():
        model, kv, config = build("llama3", decode="numpy-tiles")
        scoring = request("score", ids)
        scoring.want_logits = scoring.all_positions = True
        return ModelRunner(model, kv, config.vocab_size).execute(HandScheduler(kv, chunk=1000).plan([scoring]))

    whole = score().logits["score"]
    monkeypatch.setattr(attention, "WORKSPACE_CAP_BYTES", 1)   # one tile a launch
    assert np.array_equal(score().logits["score"], whole)


def test_prefill_attention_in_query_pieces_gives_the_same_logits(monkeypatch):
    ref = np.load(REFERENCE / "llama2.npz")
    model, kv, config = build("llama2")
    slot_kv = KvCache(np, config.num_layers, 1, model.layout.local_kv_heads, MAX_CONTEXT, config.head_dim, np.float32)
    alone = model.forward(ref["long_prompt_ids"].astype(np.int32), 0, slot_kv, 0, all_positions=True)
    monkeypatch.setattr(attention, "SCORE_ELEMENTS_CAP", 4 * 100 * 3)  # 3 query rows per piece at L = 100
    scoring = request("score", ref["long_prompt_ids"].tolist())
    scoring.want_logits = scoring.all_positions = True
    sched = HandScheduler(kv, chunk=1000)
    out = ModelRunner(model, kv, config.vocab_size).execute(sched.plan([scoring]))
    assert rel(out.logits["score"], alone) < 1e-5


@pytest.mark.parametrize("decode", ["off", "numpy", "numpy-tiles"])
@pytest.mark.parametrize("window", [5, 8, 13])
def test_sliding_window_over_blocks_equals_the_single_sequence_pass(window, decode):
    ids = np.load(REFERENCE / "mistral.npz")["long_prompt_ids"][:40].tolist()
    model, kv, config = build("mistral", sliding_window=window, decode=decode)
    slot_kv = KvCache(np, config.num_layers, 1, model.layout.local_kv_heads, MAX_CONTEXT, config.head_dim, np.float32)
    alone = model.forward(np.asarray(ids, np.int32), 0, slot_kv, 0, all_positions=True)
    assert rel(logits_in_chunks_then_rows(model, kv, config, ids, chunk=6, chunked=24, seed=1), alone) < 1e-5


SETTINGS = [
    dict(temperature=0.0),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(temperature=0.8, seed=1),
    dict(temperature=1.0, top_k=5, seed=2),
    dict(temperature=0.7, top_p=0.8, seed=3),
    dict(temperature=1.2, min_p=0.1, seed=4),
    dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=5),
]


def test_batched_sampler_picks_what_the_per_request_sampler_picks():
    rng = np.random.default_rng(0)
    vocab, steps = 300, 12
    samplers = [RowSampler.create(SamplingConfig(**s), vocab) for s in SETTINGS]
    singles = [Sampler(SamplingConfig(**s), vocab) for s in SETTINGS]
    histories = [list(rng.integers(0, vocab, 10)) for _ in SETTINGS]
    for _ in range(steps):
        logits = rng.normal(0, 3, (len(SETTINGS) + 2, vocab)).astype(np.float32)
        order = rng.permutation(len(SETTINGS))  # the batch's row order must not matter
        rows = [SampleRow(samplers[i], int(row), histories[i]) for row, i in zip(rng.permutation(len(SETTINGS) + 2), order)]
        batched = dict(zip(order, sample_rows(np, logits, rows)))
        for i, row in zip(order, (r.row for r in rows)):
            assert batched[i] == singles[i].sample(np, logits[row], histories[i]), SETTINGS[i]
            histories[i].append(batched[i])


def test_batched_draws_equal_the_per_request_sampler_with_ties_and_mixed_filters():
    """Every sampling row drawn at once (draw_rows): logits with many ties (stable order decides),
    rows with and without sorting filters side by side, top-k at the vocabulary's size."""
    rng = np.random.default_rng(5)
    vocab = 64
    settings = SETTINGS[2:] + [dict(temperature=0.6, top_k=vocab, seed=6), dict(temperature=1.0, top_k=3, seed=7),
                               dict(temperature=0.5, top_p=0.3, min_p=0.2, seed=8), dict(temperature=1.5, seed=9)]
    samplers = [RowSampler.create(SamplingConfig(**s), vocab) for s in settings]
    singles = [Sampler(SamplingConfig(**s), vocab) for s in settings]
    for _ in range(40):
        logits = rng.integers(-3, 4, (len(settings), vocab)).astype(np.float32)   # ties everywhere
        rows = [SampleRow(samplers[i], i, []) for i in range(len(settings))]
        assert sample_rows(np, logits, rows) == [singles[i].sample(np, logits[i], []) for i in range(len(settings))]


def test_build_batch_maps_each_token_to_its_block_slot():
    r1, r2 = request("x", list(range(1, 11))), request("y", [5, 6, 7])
    r2.num_computed_tokens = 2
    plan = SchedulerOutput([ScheduledChunk(r1, list(range(1, 7)), 0, [9, 3], sample=False),
                            ScheduledChunk(r2, [7], 2, [4], sample=True)])
    inputs, rows = build_batch(plan, BLOCK)
    assert inputs.positions.tolist() == [0, 1, 2, 3, 4, 5, 2]
    assert inputs.slot_mapping.tolist() == [36, 37, 38, 39, 12, 13, 18]
    assert inputs.query_start.tolist() == [0, 6, 7] and inputs.context_lens.tolist() == [6, 3]
    assert inputs.block_tables.tolist() == [[9, 3], [4, 0]]
    assert inputs.logits_rows.tolist() == [6] and [c.request.request_id for c in rows.sampling] == ["y"]
    assert rows.sampling_rows.tolist() == [0] and rows.scoring == []
    assert inputs.for_follower().logits_rows.tolist() == []


@pytest.mark.parametrize("n", [1, 3, 32, 33])
def test_a_few_decodes_build_the_arrays_of_the_whole_array_path(n, monkeypatch):
    import neuron.runner.batch as batch

    rng = np.random.default_rng(n)
    chunks = []
    for i in range(n):
        start = int(rng.integers(0, 40))
        table = rng.permutation(100)[:start // BLOCK + 1 + int(rng.integers(0, 3))].tolist()  # spare blocks too
        chunks.append(ScheduledChunk(request(f"r{i}", [1] * (start + 1)), [int(rng.integers(0, 50))], start, table,
                                     sample=True))
    plan = SchedulerOutput(chunks)
    built = {}
    for few in (0, 1000):   # every turn through the whole-array path, then every one row by row
        monkeypatch.setattr(batch, "FEW_DECODES", few)
        built[few] = batch.build_batch(plan, BLOCK)
    (arrays, rows), (few_inputs, few_rows) = built[0], built[1000]
    for name in ("token_ids", "positions", "slot_mapping", "query_start", "context_lens", "block_tables",
                 "logits_rows"):
        got, want = getattr(few_inputs, name), getattr(arrays, name)
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), name
    assert few_rows.sampling == rows.sampling and few_rows.sampling_rows.tolist() == rows.sampling_rows.tolist()
    assert few_rows.scoring == rows.scoring == []
    # a block table too short for the token fails the same way on both paths
    chunks[0].block_ids = chunks[0].block_ids[:chunks[0].start // BLOCK]
    for few in (0, 1000):
        monkeypatch.setattr(batch, "FEW_DECODES", few)
        with pytest.raises(ValueError, match="blocks cannot hold"):
            batch.build_batch(plan, BLOCK)


def test_build_batch_gives_scoring_and_sampling_chunks_their_rows():
    scored, tail = request("s", list(range(1, 6))), request("t", [4, 5, 6])
    scored.want_logits, scored.all_positions = True, True
    last = request("u", [8, 9])
    last.want_logits = True                         # scoring, last position only
    plan = SchedulerOutput([ScheduledChunk(tail, [6], 2, [1], sample=True),
                            ScheduledChunk(scored, [1, 2, 3], 0, [2], sample=False),
                            ScheduledChunk(last, [8, 9], 0, [3], sample=True),
                            ScheduledChunk(request("v", [7, 7]), [7], 0, [4], sample=False)])
    inputs, rows = build_batch(plan, BLOCK)
    # rows: t's last (0), s's three (1-3), u's last (5); v's chunk samples nothing yet
    assert inputs.logits_rows.tolist() == [0, 1, 2, 3, 5]
    assert [c.request.request_id for c in rows.sampling] == ["t"] and rows.sampling_rows.tolist() == [0]
    assert [(s.chunk.request.request_id, s.lo, s.hi) for s in rows.scoring] == [("s", 1, 4), ("u", 4, 5)]


def test_scheduler_and_runner_give_reference_tokens_through_preemption_and_prefix_hits():
    from neuron.engine.kv_blocks import KVBlockManager
    from neuron.engine.scheduler import Scheduler
    ref = np.load(REFERENCE / "qwen3.npz")
    model, _, config = build("qwen3")
    kv = PagedKvCache(np, config.num_layers, 24, BLOCK, model.layout.local_kv_heads, config.head_dim, np.float32,
                      MAX_CONTEXT)
    manager = KVBlockManager(kv.num_blocks, BLOCK)
    scheduler = Scheduler(manager, max_batched_tokens=16, max_seqs=8)
    runner = ModelRunner(model, kv, config.vocab_size)
    prompt = ref["prompt_ids"].tolist()
    requests = [request(f"r{i}", prompt, max_tokens=32, ignore_eos=True) for i in range(5)]
    for r in requests:
        scheduler.add(r)
    preempted = 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        preempted += len(plan.preempted)
        scheduler.update(plan, runner.execute(plan))
    assert preempted > 0  # 24 blocks of 4 cannot hold five requests of 40+ tokens at once
    assert manager.stats.hits > 0
    for r in requests:
        assert r.output_ids == [int(t) for t in ref["greedy_ids"]], r.request_id
    assert manager.num_free_blocks == kv.num_blocks


def test_a_turn_travels_to_remote_followers_unchanged():
    from neuron.groups import inputs_of, step_command
    r1, r2 = request("x", list(range(1, 11))), request("y", [5, 6, 7])
    plan = SchedulerOutput([ScheduledChunk(r1, list(range(1, 7)), 0, [9, 3], sample=False),
                            ScheduledChunk(r2, [5, 6, 7], 0, [4], sample=True)])
    inputs, _ = build_batch(plan, BLOCK)
    command = step_command("g", 12, inputs.for_follower())
    copy = inputs_of(type(command).FromString(command.SerializeToString()))
    for field in dataclasses.fields(inputs):
        expected = getattr(inputs.for_follower(), field.name)
        assert np.array_equal(getattr(copy, field.name), expected) and getattr(copy, field.name).dtype == expected.dtype


def test_a_turn_that_samples_nothing_reads_no_logits_on_any_device():
    """A turn of prompt chunks that all end before their prompts computes no logits (the model
    returns None); the sampler must not look at them, on a GPU array module either (a stand-in
    here: anything but NumPy once took the GPU argmax path and failed on the missing logits)."""
    class DeviceArrays:              # not NumPy: the runner takes its device paths
        zeros, int64 = staticmethod(np.zeros), np.int64

    class NoLogits:
        xp = DeviceArrays
        decode_attention = None

    from neuron.runner.sampler import greedy_rows
    runner = ModelRunner(NoLogits(), None, 32)
    assert runner._sample(None, [], np.zeros(0, dtype=np.int64), greedy=True).shape == (0,)
    assert greedy_rows(DeviceArrays, None, np.zeros(0, dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("rows, index", [
    ([0, 1, 2, 3], [0, 1, 2, 3]),        # no request finished: one copy
    ([0, 1, 2], [0, 1, 3]),              # the third of four finished before this turn
    ([0, 1, 2], [1, 2, 3]),
    ([1, 2], [0, 1]),                     # a row not fed by the turn before
    ([0], [0]),
    ([], []),
])
def test_fed_rows_take_the_ids_the_turn_before_sampled(rows, index):
    from neuron.runner.batch import feed_tokens

    ids = np.array([41, 42, 43, 44], dtype=np.int64)
    token_ids = np.full(5, -1, dtype=np.int32)
    feed_tokens(np, token_ids, (np.asarray(rows, dtype=np.int32), ids, np.asarray(index, dtype=np.int64)))
    expected = np.full(5, -1, dtype=np.int32)
    expected[rows] = ids[index]
    assert token_ids.tolist() == expected.tolist()
