"""The GPU decode path's bookkeeping, run eagerly on CPU: decode turns padded into batch-size buckets
(scratch-block rows) and attended by the paged kernel's NumPy twin give every request the greedy
tokens transformers gives it alone, and leave the requests' blocks as the plain path would."""
from __future__ import annotations

import numpy as np
import pytest

from neuron.runner.cuda_graphs import DecodeGraphs, is_decode_only
from neuron.runner.model_runner import ModelRunner
from tests.helpers import REFERENCE, load_fixture_shard
from tests.unit.test_runner import HandScheduler, build, request, run_to


class CountingGraphs(DecodeGraphs):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.turns = []
        self.greedy_turns = 0

    def run(self, inputs, tokens_from=None):
        self.turns.append(len(inputs.context_lens))
        return super().run(inputs, tokens_from)

    def run_greedy(self, inputs, tokens_from=None):
        self.turns.append(len(inputs.context_lens))
        self.greedy_turns += 1
        return super().run_greedy(inputs, tokens_from)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_bucketed_decode_turns_give_the_reference_tokens(name):
    ref = np.load(REFERENCE / f"{name}.npz")
    model, kv, config = build(name, decode="numpy")
    runner = ModelRunner(model, kv, config.vocab_size)
    graphs = CountingGraphs(model, kv, max_seqs=8, capture=False)
    graphs.prepare()
    assert sorted(graphs.buckets) == [1, 2, 4, 8]
    runner.graphs = graphs
    prompt = ref["prompt_ids"].tolist()
    # three requests (five rows pad to the bucket of 8 once the late ones join), prefilled in chunks
    first = [request("a", prompt), request("b", prompt[:5])]
    late = {2: [request("c", prompt)], 9: [request("d", prompt), request("e", prompt)]}
    done = run_to(runner, HandScheduler(kv, chunk=4), first, 24, late)
    assert max(graphs.turns) == 5 and min(graphs.turns) < 5  # turns of 5 rows ran in the bucket of 8
    assert graphs.greedy_turns == len(graphs.turns)   # every row greedy: the bucket's pick chose the ids
    for r in done:
        if r.request_id != "b":
            assert r.output_ids == [int(t) for t in ref["greedy_ids"][:24]], r.request_id
    # the short prompt's tokens equal the plain path's (no graphs, gather attention)
    model2, kv2, _ = build(name)
    plain = run_to(ModelRunner(model2, kv2, config.vocab_size), HandScheduler(kv2, chunk=4), [request("b", prompt[:5])], 24)
    assert next(r for r in done if r.request_id == "b").output_ids == plain[0].output_ids


def test_only_turns_of_single_token_chunks_count_as_decode():
    from neuron.engine.plan import ScheduledChunk, SchedulerOutput
    from neuron.runner.batch import build_batch
    a, b = request("a", [1, 2, 3]), request("b", [4, 5])
    a.num_computed_tokens, b.num_computed_tokens = 2, 1
    decode, _ = build_batch(SchedulerOutput([ScheduledChunk(a, [3], 2, [0], True), ScheduledChunk(b, [5], 1, [1], True)]), 4)
    assert is_decode_only(decode) and is_decode_only(decode.for_follower())
    mixed, _ = build_batch(SchedulerOutput([ScheduledChunk(a, [2, 3], 1, [0], True)]), 4)
    assert not is_decode_only(mixed)


def test_bucket_inputs_are_not_allocated_in_the_graphs_private_pool(monkeypatch):
    """Memory of the private pool is the captured graphs' intermediates, which every replay
    overwrites: a bucket's input buffers (its `rows` above all, never uploaded again) must come from
    the ordinary allocator, or a larger bucket's replay corrupts a smaller bucket's turns."""
    import contextlib

    model, kv, _ = build("llama3", decode="numpy")
    graphs = DecodeGraphs(model, kv, max_seqs=4, capture=False)
    inside = {"pool": False}
    allocated_in_pool = []

    @contextlib.contextmanager
    def private_pool():
        inside["pool"] = True
        try:
            yield
        finally:
            inside["pool"] = False

    class RecordingXp:
        """numpy, noting which arrays are made while the private pool is the allocator."""
        def __getattr__(self, name):
            attr = getattr(np, name)
            if name in ("zeros", "full", "ones", "arange", "empty", "asarray"):
                def make(*args, **kwargs):
                    if inside["pool"]:
                        allocated_in_pool.append(name)
                    return attr(*args, **kwargs)
                return make
            return attr

    monkeypatch.setattr(graphs, "_allocating", private_pool)
    monkeypatch.setattr(graphs, "xp", RecordingXp())
    bucket = graphs._build(4)
    assert allocated_in_pool == []
    assert bucket.rows.tolist() == [0, 1, 2, 3]
    # a mixed bucket's tiles too: the warm-up before its capture (inside the pool) finds them uploaded
    mixed_model, mixed_kv, _ = build("llama3", decode="numpy-tiles")
    mixed = DecodeGraphs(mixed_model, mixed_kv, max_seqs=4, capture=False, mixed_chunk=3)
    monkeypatch.setattr(mixed, "_allocating", private_pool)
    monkeypatch.setattr(mixed, "xp", RecordingXp())
    bucket = mixed._build(4, 3)
    assert allocated_in_pool == [] and bucket.attention._device_tiles


def test_shard_info_reports_the_captured_buckets_and_nothing_for_eager_turns():
    from types import SimpleNamespace

    from neuron.runner.cuda_graphs import CaptureReport
    from neuron.service.convert import graph_fields

    assert graph_fields(None) == {}
    assert graph_fields(SimpleNamespace(capture_graphs=False, report=CaptureReport([1, 2], 0.1, 0))) == {}
    captured = SimpleNamespace(capture_graphs=True, report=CaptureReport([8, 1, 4], 0.25, 3 << 20))
    assert graph_fields(captured) == {"cuda_graph_batch_sizes": [1, 4, 8], "cuda_graph_seconds": 0.25,
                                      "cuda_graph_pool_bytes": 3 << 20}
    mixed = SimpleNamespace(capture_graphs=True, mixed_chunk=128,
                            report=CaptureReport([2, 1], 0.5, 4 << 20, mixed_sizes=[2, 1]))
    assert graph_fields(mixed) == {"cuda_graph_batch_sizes": [1, 2], "cuda_graph_seconds": 0.5,
                                   "cuda_graph_pool_bytes": 4 << 20, "cuda_graph_mixed_batch_sizes": [1, 2],
                                   "cuda_graph_mixed_chunk": 128}


class CountingMixed(DecodeGraphs):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mixed_turns = []

    def run_mixed(self, inputs):
        lengths = np.diff(inputs.query_start)
        # (requests, the chunk's index, logits rows)
        self.mixed_turns.append((len(lengths), int(np.flatnonzero(lengths != 1)[0]), len(inputs.logits_rows)))
        return super().run_mixed(inputs)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_mixed_buckets_give_the_tokens_of_eager_turns(name):
    """A long prompt admitted in chunks while two requests decode (and a third joins with it):
    its middle chunks ride in mixed buckets (the decode rows padded to the bucket, then the chunk's
    rows in tiles, the chunk first among the plan's requests or between them), on the tensor-core
    kernel's mirror; every request's tokens equal transformers' (the decoders) and those of the
    same turns run eagerly (the long prompt)."""
    ref = np.load(REFERENCE / f"{name}.npz")
    prompt, long_prompt = ref["prompt_ids"].tolist(), ref["long_prompt_ids"].tolist()

    def serve(mixed_chunk: int):
        model, kv, config = build(name, decode="numpy-tiles")
        runner = ModelRunner(model, kv, config.vocab_size)
        graphs = CountingMixed(model, kv, max_seqs=8, capture=False, mixed_chunk=mixed_chunk)
        graphs.prepare()
        runner.graphs = graphs
        decoders = [request(r, prompt) for r in "ab"]
        late = {5: [request("long", long_prompt), request("d", prompt)]}
        done = run_to(runner, HandScheduler(kv, chunk=4), decoders, 32, late)
        return {r.request_id: r.output_ids for r in done}, graphs

    tokens, graphs = serve(mixed_chunk=4)
    assert sorted(graphs.mixed) == [0, 1, 2, 4, 8] and graphs.report.mixed_sizes
    # 100 prompt tokens in chunks of 4: 24 middle chunks and the last, which samples; the first three
    # share their turns with d's prompt chunks (eager), the others are mixed, before d's decode row
    # (three decode rows: the bucket of 4 pads one)
    assert graphs.mixed_turns == [(4, 2, 3)] * 21 + [(4, 2, 4)]
    for rid in "abd":
        assert tokens[rid] == [int(t) for t in ref["greedy_ids"]], rid
    assert tokens["long"][0] == int(np.argmax(ref["long_logits_last"]))
    eager, eager_graphs = serve(mixed_chunk=0)
    assert eager_graphs.mixed_turns == [] and not eager_graphs.mixed
    assert tokens == eager


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_a_prompt_alone_and_chunks_shorter_than_the_bucket_ride_mixed_buckets(name):
    """A prompt alone (the bucket of no decode rows) in a chunk of the bucket's size and then a
    shorter one that samples, padded; later a short prompt joins the decoding request (one decode
    row and 6 prompt rows, padded to 8): each of those turns replays a mixed bucket, and the tokens
    equal transformers' (the full prompt) and the eager path's (the short one)."""
    ref = np.load(REFERENCE / f"{name}.npz")
    prompt = ref["prompt_ids"].tolist()
    model, kv, config = build(name, decode="numpy-tiles")
    runner = ModelRunner(model, kv, config.vocab_size)
    graphs = CountingMixed(model, kv, max_seqs=4, capture=False, mixed_chunk=8)
    graphs.prepare()
    runner.graphs = graphs
    done = run_to(runner, HandScheduler(kv, chunk=8), [request("a", prompt)], 24, {4: [request("b", prompt[:6])]})
    assert graphs.mixed_turns == [(1, 0, 0), (1, 0, 1), (2, 1, 2)]
    tokens = {r.request_id: r.output_ids for r in done}
    assert tokens["a"] == [int(t) for t in ref["greedy_ids"][:24]]
    model2, kv2, _ = build(name)
    plain = run_to(ModelRunner(model2, kv2, config.vocab_size), HandScheduler(kv2, chunk=8), [request("b", prompt[:6])], 24)
    assert tokens["b"][:len(plain[0].output_ids)] == plain[0].output_ids


def test_a_mixed_turn_qualifies_only_with_one_chunk_that_fits_the_bucket():
    from neuron.engine.plan import ScheduledChunk, SchedulerOutput
    from neuron.runner.batch import build_batch

    model, kv, _ = build("llama3", decode="numpy-tiles")
    graphs = DecodeGraphs(model, kv, max_seqs=4, capture=False, mixed_chunk=3)
    graphs.prepare()
    a, b, c = request("a", [1, 2, 3]), request("b", [4, 5]), request("c", list(range(10, 20)))
    a.num_computed_tokens, b.num_computed_tokens = 2, 1

    def inputs(*chunks):
        return build_batch(SchedulerOutput(list(chunks)), kv.block_size)[0]
    decode_a, decode_b = ScheduledChunk(a, [3], 2, [0], True), ScheduledChunk(b, [5], 1, [1], True)
    middle = ScheduledChunk(c, [10, 11, 12], 0, [2], False)
    assert graphs.can_run_mixed(inputs(decode_a, middle, decode_b))          # the chunk may sit anywhere
    assert graphs.can_run_mixed(inputs(decode_a, ScheduledChunk(c, [10, 11, 12], 0, [2], True)))  # it samples
    assert graphs.can_run_mixed(inputs(decode_a, ScheduledChunk(c, [10, 11], 0, [2], False)))    # shorter
    assert graphs.can_run_mixed(inputs(middle))                                 # a prompt alone
    assert not graphs.can_run_mixed(inputs(decode_a, ScheduledChunk(c, [10, 11, 12, 13], 0, [2, 3], False)))  # longer
    assert not graphs.can_run_mixed(inputs(decode_a, middle, ScheduledChunk(b, [4, 5, 6], 0, [1], False)))
    # a decode row that does not sample (a prompt's last token, held back) is not a decode bucket's row
    assert not graphs.can_run_mixed(inputs(ScheduledChunk(a, [3], 2, [0], False), middle))
    # the padding rows continue the chunk's positions: not past the shard's context
    near_end = request("e", list(range(kv.max_context)))
    assert not graphs.can_run_mixed(inputs(ScheduledChunk(near_end, [1, 2], kv.max_context - 2,
                                                          list(range(kv.max_context // kv.block_size)), False)))
    assert not DecodeGraphs(model, kv, max_seqs=4, capture=False, mixed_chunk=0).can_run_mixed(inputs(decode_a, middle))
    # a model whose attention takes no prompt tiles gets no mixed buckets
    plain, plain_kv, _ = build("llama3", decode="numpy")
    assert DecodeGraphs(plain, plain_kv, max_seqs=4, capture=False, mixed_chunk=3).mixed_chunk == 0


def test_a_failed_mixed_capture_leaves_the_decode_graphs(monkeypatch):
    model, kv, _ = build("llama3", decode="numpy-tiles")
    graphs = DecodeGraphs(model, kv, max_seqs=4, capture=False, mixed_chunk=3)
    build_bucket = graphs._build

    def failing(size, chunk=0):
        if chunk:
            raise RuntimeError("capture refused")
        return build_bucket(size)
    monkeypatch.setattr(graphs, "_build", failing)
    report = graphs.prepare()
    assert sorted(graphs.buckets) == [1, 2, 4] and graphs.mixed == {} and report.mixed_sizes == []
    assert "mixed bucket" in report.skipped


class RecordingPool:
    """Stands in for the graphs' CuPy pool: notes what the buckets still held when it was emptied."""

    def __init__(self, graphs: DecodeGraphs):
        self.graphs, self.freed_with = graphs, None
        self.buckets = [*graphs.buckets.values(), *graphs.mixed.values()]

    def free_all_blocks(self):
        self.freed_with = [(b.graph, b.logits) for b in self.buckets]

    def total_bytes(self):
        return 0


def test_release_drops_the_graphs_and_their_logits_before_emptying_the_pool():
    """CuPy's pool keeps its free blocks when it is garbage (on the H200 20 load/drop cycles left
    204 MiB): release must empty it, and only once nothing in it is referenced."""
    model, kv, _ = build("llama3", decode="numpy-tiles")
    graphs = DecodeGraphs(model, kv, max_seqs=4, capture=False, mixed_chunk=3)
    graphs.prepare()
    for bucket in [*graphs.buckets.values(), *graphs.mixed.values()]:
        bucket.graph, bucket.logits = object(), np.zeros(1)   # what a capture leaves
    pool = graphs.pool = RecordingPool(graphs)
    assert len(pool.buckets) == 7   # decode buckets 1, 2, 4; mixed 0, 1, 2, 4
    graphs.release()
    assert pool.freed_with == [(None, None)] * 7
    assert graphs.pool is None and graphs.buckets == {} and graphs.mixed == {}


def test_dropping_a_shard_releases_its_decode_graphs():
    from neuron.device import DeviceSpec
    from neuron.worker import DeviceWorker, DropShardJob

    worker = DeviceWorker(DeviceSpec("cpu", "cpu", 0), 1 << 30)
    worker.start()
    try:
        shard = load_fixture_shard(worker, 5)
        runner = shard.engine.runner
        assert runner.graphs is None   # a CPU device captures none: give it some, with a pool
        graphs = runner.graphs = DecodeGraphs(shard.model, shard.kv, max_seqs=2, capture=False)
        graphs.prepare()
        pool = graphs.pool = RecordingPool(graphs)
        del shard
        worker.submit(DropShardJob(5)).result(30)
        assert pool.freed_with == [(None, None)] * 2 and runner.graphs is None
    finally:
        worker.stop()
