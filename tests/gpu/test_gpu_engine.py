"""The serving engine on a GPU (CuPy): the batched pass over the paged cache matches transformers in
float32, and every request's greedy tokens are the same batched as alone, float32 and bfloat16."""
from __future__ import annotations

import numpy as np
import pytest

from bench.gpu_checks import FIXTURE_NAMES, FIXTURES, FP32_REL_L2, HALF_COSINE, cosine, drop, forward, generate, \
    generate_async, load, rel_l2, start_worker, wait
from neuron.service.convert import graph_fields

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def worker():
    w = start_worker(0)
    yield w
    w.stop()


def batch_cases(name: str) -> list[tuple[list[int], list[int]]]:
    ref = np.load(FIXTURES / "reference" / f"{name}_batch.npz")
    prompts = np.split(ref["prompt_ids"], np.cumsum(ref["prompt_lengths"])[:-1])
    return [(p.tolist(), g.tolist()) for p, g in zip(prompts, ref["greedy_ids"])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batched_greedy_equals_alone_on_the_gpu(worker, name, dtype):
    ref = np.load(FIXTURES / "reference" / f"{name}.npz")
    handle, shard = load(worker, FIXTURES / "models" / name, dtype, max_context=256, max_seqs=16)
    try:
        assert shard.model.decode_attention is not None  # decode rows through the paged decode kernel
        logits = forward(worker, handle, ref["prompt_ids"], all_positions=True)
        if dtype == "float32":
            assert rel_l2(logits, ref["logits_all"]) < FP32_REL_L2
        else:
            assert cosine(logits, ref["logits_all"]) > HALF_COSINE
        cases = batch_cases(name)
        alone = [generate(worker, handle, prompt, 32) for prompt, _ in cases]
        together = [generate_async(worker, handle, prompt, 32) for prompt, _ in cases]
        batched = [wait(c) for c in together]
        assert batched == alone
        if dtype == "float32":
            assert alone == [expected for _, expected in cases]
    finally:
        drop(worker, handle)


def test_a_gpu_load_captures_graphs_warms_up_and_reports_both(worker):
    stages = []
    handle, shard = load(worker, FIXTURES / "models" / FIXTURE_NAMES[0], "bfloat16", max_context=256, max_seqs=16,
                         progress=stages.append)
    try:
        graphs = shard.engine.runner.graphs
        assert graphs is not None and graphs.report.sizes and shard.warm_up_seconds > 0
        captured = [p for p in stages if p.stage == "cuda-graphs" and p.tensors_total]
        assert captured and captured[-1].tensors_done == len(graphs.report.sizes) == captured[-1].tensors_total
        assert "warm-up" in [p.stage for p in stages]
        stats = shard.engine.stats
        assert (stats.running, stats.kv.blocks_used, stats.kv.blocks_cached, stats.kv.queries) == (0, 0, 0, 0)
    finally:
        drop(worker, handle)


@pytest.fixture(scope="module")
def sync_worker():
    from neuron.device import DeviceSpec
    from neuron.engine.settings import EngineSettings
    from neuron.worker import DeviceWorker

    w = DeviceWorker(DeviceSpec("0", "cuda", 0), settings=EngineSettings(async_scheduling=False))
    w.start()
    yield w
    w.stop()


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen3"])
def test_async_scheduling_gives_the_tokens_of_the_engine_without_it(worker, sync_worker, name):
    """Decode turns queued behind the running one (the default: graph replays fed on the device, ids
    through a queued copy): every request's bf16 greedy tokens, alone and batched, equal those of
    the engine that runs one turn at a time."""
    cases = batch_cases(name)
    handle, shard = load(sync_worker, FIXTURES / "models" / name, "bfloat16", max_context=256, max_seqs=16)
    try:
        assert not shard.engine.async_scheduling
        want = [generate(sync_worker, handle, prompt, 32) for prompt, _ in cases]
    finally:
        drop(sync_worker, handle)
    handle, shard = load(worker, FIXTURES / "models" / name, "bfloat16", max_context=256, max_seqs=16)
    try:
        assert shard.engine.async_scheduling and shard.engine.runner.graphs is not None
        alone = [generate(worker, handle, prompt, 32) for prompt, _ in cases]
        batched = [wait(c) for c in [generate_async(worker, handle, prompt, 32) for prompt, _ in cases]]
        assert alone == want and batched == want
    finally:
        drop(worker, handle)


@pytest.fixture(scope="module")
def small_turn_worker():
    from neuron.device import DeviceSpec
    from neuron.engine.settings import EngineSettings
    from neuron.worker import DeviceWorker

    w = DeviceWorker(DeviceSpec("0", "cuda", 0), settings=EngineSettings(max_batched_tokens=4, max_prefill_chunk=0))
    w.start()
    yield w
    w.stop()


@pytest.mark.parametrize("name", ["llama3", "qwen3"])
def test_a_prompt_over_several_turns_gives_the_reference_tokens(small_turn_worker, name):
    """Four tokens a turn: the prompt takes several turns that sample nothing (no logits at all)
    before its first token; fp32 greedy tokens equal transformers', alone and beside another."""
    ref = np.load(FIXTURES / "reference" / f"{name}.npz")
    prompt, expected = ref["prompt_ids"].tolist(), [int(t) for t in ref["greedy_ids"]]
    assert len(prompt) > 8
    handle, _ = load(small_turn_worker, FIXTURES / "models" / name, "float32", max_context=256, max_seqs=4)
    try:
        assert generate(small_turn_worker, handle, prompt, len(expected)) == expected
        pair = [generate_async(small_turn_worker, handle, p, len(expected)) for p in (prompt, prompt[:5])]
        assert wait(pair[0]) == expected
        wait(pair[1])
    finally:
        drop(small_turn_worker, handle)


def _chunked_worker(mixed_graphs: bool):
    from neuron.device import DeviceSpec
    from neuron.engine.settings import EngineSettings
    from neuron.worker import DeviceWorker

    w = DeviceWorker(DeviceSpec("0", "cuda", 0), settings=EngineSettings(max_prefill_chunk=8, mixed_graphs=mixed_graphs))
    w.start()
    return w


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_mixed_graphs_give_the_tokens_of_eager_mixed_turns(name):
    """A 7-token prompt alone (the mixed bucket of no decode rows, padded to 8), then a 100-token
    prompt admitted in chunks of 8 while three requests decode: its chunks replay mixed graphs
    (captured at load; bfloat16, whose attention takes prompt rows in tiles); every request's
    tokens equal those of a neuron that launches such turns eagerly."""
    dtype = "bfloat16"
    import time

    ref = np.load(FIXTURES / "reference" / f"{name}.npz")
    prompt, long_prompt = ref["prompt_ids"].tolist(), ref["long_prompt_ids"].tolist()
    results, replays = {}, {}
    for mixed in (True, False):
        w = _chunked_worker(mixed)
        try:
            handle, shard = load(w, FIXTURES / "models" / name, dtype, max_context=256, max_seqs=8)
            graphs = shard.engine.runner.graphs
            assert bool(graphs.mixed) == mixed and graphs.mixed_chunk == (8 if mixed else 0)
            reported = graph_fields(graphs)   # what ShardInfo and ShardSummary say of them
            assert reported.get("cuda_graph_mixed_batch_sizes", []) == (sorted(graphs.mixed) if mixed else [])
            assert reported.get("cuda_graph_mixed_chunk", 0) == (8 if mixed else 0)
            count = []   # each mixed replay's decode rows
            run_mixed = graphs.run_mixed
            graphs.run_mixed = lambda inputs: count.append(int((np.diff(inputs.query_start) == 1).sum())) or run_mixed(inputs)
            alone = wait(generate_async(w, handle, prompt[:7], 16))
            alone_replays = list(count)
            decoders = [generate_async(w, handle, p, 240) for p in (prompt, prompt[:9], prompt[:11])]
            time.sleep(0.05)   # the three are decoding when the long prompt arrives
            late = generate_async(w, handle, long_prompt, 8)
            results[mixed] = [alone] + [wait(c) for c in decoders] + [wait(late)]
            replays[mixed] = (alone_replays, len(count))
            drop(w, handle)
        finally:
            w.stop()
    assert replays[True][0] == [0] and replays[True][1] >= 2 and replays[False] == ([], 0)
    assert results[True] == results[False]
