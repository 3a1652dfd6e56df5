"""The fused engine (neuron/model/fused.py) on the NumPy mirror of its CUDA kernels, against the
plain path and transformers: the engine's layouts, chunking and split-K attention are checked here
on the CPU; tests/gpu checks each CUDA kernel against the same mirror."""
from __future__ import annotations

import numpy as np
import pytest

from neuron.collectives import SingleRank
from neuron.kv_cache import KvCache
from neuron.loader import Checkpoint
from neuron.model.config import ModelConfig
from neuron.model.llama import LlamaModel
from neuron.model.sharding import TpLayout, parameter_reads
from neuron.sampling import Sampler, SamplingConfig
from tests.helpers import FIXTURE_NAMES, MODELS, REFERENCE


def build(name: str, dtype, fused: str, max_context: int = 256):
    directory = MODELS / name
    config = ModelConfig.from_dir(directory)
    layout = TpLayout.build(config)
    ckpt = Checkpoint(directory)
    params = {}
    for key, reads in parameter_reads(config, layout, "lm_head.weight" in ckpt.tensors).items():
        parts = [ckpt.read(r) for r in reads]
        params[key] = (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(dtype)
    model = LlamaModel(config, layout, params, np, SingleRank(), max_context, fused=fused)
    kv = KvCache(np, config.num_layers, 2, layout.local_kv_heads, max_context, config.head_dim, np.dtype(dtype))
    model.prepare(kv)
    return model, kv, config


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def greedy(model, kv, config, prompt, n: int, start_slot: int = 1) -> list[int]:
    sampler = Sampler(SamplingConfig(max_tokens=n), config.vocab_size)
    ids, out, pos, feed = list(prompt), [], 0, list(prompt)
    for _ in range(n):
        token = model.next_token(feed, pos, kv, start_slot, sampler, lambda: ids + out)
        pos += len(feed)
        out.append(token)
        feed = [token]
    return out


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_mirror_matches_transformers_in_float32(name):
    ref = np.load(REFERENCE / f"{name}.npz")
    model, kv, config = build(name, np.float32, "numpy")
    assert model.fused is not None
    prompt = ref["prompt_ids"].astype(np.int32)
    assert rel(model.forward(prompt, 0, kv, 0)[0], ref["logits_last"]) < 1e-4
    assert rel(model.forward(prompt, 0, kv, 0, all_positions=True), ref["logits_all"]) < 1e-4
    assert rel(model.forward(ref["long_prompt_ids"].astype(np.int32), 0, kv, 0)[0], ref["long_logits_last"]) < 1e-4
    assert rel(model.forward(prompt[:1], 0, kv, 0)[0], ref["logits_all"][0]) < 1e-4  # the decode step
    assert greedy(model, kv, config, prompt, 32) == [int(t) for t in ref["greedy_ids"]]


@pytest.mark.parametrize("name", ["llama2", "llama_sharded", "qwen2"])
def test_decode_over_several_attention_splits(name):
    """Decode after a 100-token prompt crosses several split-K chunks; each step's logits must equal
    the plain path's full recomputation."""
    ref = np.load(REFERENCE / f"{name}.npz")
    fused, kv_f, config = build(name, np.float32, "numpy")
    plain, kv_p, _ = build(name, np.float32, "off")
    tokens = [int(t) for t in ref["long_prompt_ids"]]
    fused.forward(np.asarray(tokens, np.int32), 0, kv_f, 0)
    for step in range(40):
        token = (step * 37 + 11) % config.vocab_size
        got = fused.forward(np.asarray([token], np.int32), len(tokens), kv_f, 0)[0]
        tokens.append(token)
        want = plain.forward(np.asarray(tokens, np.int32), 0, kv_p, 0)[0]
        assert rel(got, want) < 1e-5, step


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_mirror_greedy_equals_plain_in_float16(name):
    """NumPy's float16 matmul accumulates in float32 like cuBLAS, so the plain path here is a fair
    stand-in for the GPU plain path: the fused arithmetic must pick the same greedy tokens."""
    ref = np.load(REFERENCE / f"{name}.npz")
    prompt = [int(t) for t in ref["prompt_ids"]]
    fused, kv_f, config = build(name, np.float16, "numpy")
    plain, kv_p, _ = build(name, np.float16, "off")
    assert greedy(fused, kv_f, config, prompt, 32) == greedy(plain, kv_p, config, prompt, 32)


def test_chained_greedy_steps_stay_correct_when_interleaved_or_overridden():
    """Greedy decode queues the next step before reading this one's token (chained on the device).
    Two sequences interleaved in two slots, one of which is sometimes fed a token other than its
    greedy pick (as a stop string or a new request would), must still get exactly the plain path's
    next token at every step."""
    ref = np.load(REFERENCE / "llama3.npz")
    fused, kv, config = build("llama3", np.float32, "numpy")
    plain, kv_p, _ = build("llama3", np.float32, "off")
    greedy_cfg = Sampler(SamplingConfig(max_tokens=64), config.vocab_size)
    seqs = {0: [int(t) for t in ref["prompt_ids"]], 1: [int(t) for t in ref["long_prompt_ids"][:20]]}
    fed = {0: None, 1: None}
    for step in range(24):
        for slot in (0, 1):
            history = seqs[slot]
            if fed[slot] is None:
                feed, start = history, 0
            else:
                feed, start = history[-1:], len(history) - 1
            got = fused.next_token(feed, start, kv, slot, greedy_cfg, lambda: history)
            want = int(np.argmax(plain.forward(np.asarray(history, np.int32), 0, kv_p, 0)[0]))
            assert got == want, (step, slot)
            nxt = got if not (slot == 1 and step % 5 == 2) else (got + 7) % config.vocab_size  # override
            history.append(nxt)
            fed[slot] = nxt
