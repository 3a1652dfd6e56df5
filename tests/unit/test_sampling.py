"""Sampling parameters (resolution against generation_config.json, validation) and the sampler,
on numpy; the sampler's code is the same on cupy."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from neuron.sampling import Sampler, SamplingConfig, SamplingRequest, resolve_sampling
from neuron.service.convert import sampling_request
from common.proto.neuron.v1 import neuron_pb2
from common.errors import InvalidArgument

VOCAB = 1000
LLAMA3_GENERATION_CONFIG = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128009],
                            "temperature": 0.6, "top_p": 0.9}


def resolve(generation_config=None, context_left=4096, vocab_size=VOCAB, **fields) -> SamplingConfig:
    """Through the service edge's conversion, as a gRPC request is resolved."""
    return resolve_sampling(sampling_request(neuron_pb2.SamplingParams(**fields)), generation_config or {},
                            context_left, vocab_size)


def draw_many(config: SamplingConfig, logits, n: int, history=()) -> np.ndarray:
    sampler = Sampler(config, len(logits))
    return np.array([sampler.sample(np, logits, history) for _ in range(n)])


# ------------------------------------------------------------------ resolve_sampling

def test_defaults():
    config = resolve()
    assert config == SamplingConfig(max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                    repetition_penalty=1.0, seed=None, stop=(), stop_token_ids=frozenset(),
                                    ignore_eos=False)
    assert config.greedy


def test_request_values():
    config = resolve(max_tokens=10, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.1,
                     seed=2**64 - 1, stop=["\n\n", "END"], stop_token_ids=[5, 7], ignore_eos=True)
    # float fields come back as written, not as their float32 approximations
    assert config == SamplingConfig(max_tokens=10, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05,
                                    repetition_penalty=1.1, seed=2**64 - 1, stop=("\n\n", "END"),
                                    stop_token_ids=frozenset({5, 7}), ignore_eos=True)
    assert not config.greedy


def test_explicit_zero_temperature_is_greedy():
    assert resolve(LLAMA3_GENERATION_CONFIG, temperature=0.0).greedy


def test_max_tokens_capped_by_context():
    assert resolve(context_left=100).max_tokens == 100
    assert resolve(context_left=100, max_tokens=500).max_tokens == 100
    assert resolve(context_left=100, max_tokens=5).max_tokens == 5
    with pytest.raises(InvalidArgument, match="prompt fills the model's whole context"):
        resolve(context_left=0)


def test_length_limit_names_the_binding_limit():
    # The stop_reason at the length limit: "context" only when the context left was the smaller one.
    assert resolve(context_left=100, max_tokens=500).length_limit == "context"
    assert resolve(context_left=100).length_limit == "context"  # the default of 256 does not fit
    assert resolve(context_left=300).length_limit == "max_tokens"
    assert resolve(context_left=100, max_tokens=100).length_limit == "max_tokens"
    assert resolve({"max_new_tokens": 64}, context_left=50).length_limit == "context"


def test_service_edge_conversion():
    # Unset optional fields stay None (so generation_config.json can fill them); set ones keep the
    # value the client wrote, zero included.
    assert sampling_request(neuron_pb2.SamplingParams()) == SamplingRequest()
    converted = sampling_request(neuron_pb2.SamplingParams(temperature=0.0, top_p=0.7, max_tokens=3, seed=0,
                                                           stop=["a"], stop_token_ids=[4], ignore_eos=True))
    assert converted == SamplingRequest(max_tokens=3, temperature=0.0, top_p=0.7, seed=0, stop=("a",),
                                        stop_token_ids=(4,), ignore_eos=True)
    # The domain type is what resolve_sampling takes; no protobuf needed below the edge.
    assert resolve_sampling(SamplingRequest(temperature=0.5), {}, 10, VOCAB).temperature == 0.5


def test_generation_config_do_sample():
    config = resolve(LLAMA3_GENERATION_CONFIG)
    assert (config.temperature, config.top_p, config.top_k) == (0.6, 0.9, 0)
    # The request wins over the model's values.
    assert resolve(LLAMA3_GENERATION_CONFIG, temperature=1.2, top_p=1.0).temperature == 1.2
    assert resolve(LLAMA3_GENERATION_CONFIG, top_p=1.0).top_p == 1.0
    # do_sample without a temperature samples at transformers' default of 1.0.
    config = resolve({"do_sample": True, "top_k": 20, "min_p": 0.1})
    assert (config.temperature, config.top_k, config.min_p) == (1.0, 20, 0.1)


def test_generation_config_without_do_sample_is_greedy():
    for generation_config in ({**LLAMA3_GENERATION_CONFIG, "do_sample": False},
                              {"temperature": 0.6, "top_p": 0.9, "top_k": 20}):
        config = resolve(generation_config)
        assert config.greedy and (config.top_p, config.top_k) == (1.0, 0)
        # A request temperature turns sampling on; the model's sampling knobs still do not apply.
        config = resolve(generation_config, temperature=0.8)
        assert (config.temperature, config.top_p, config.top_k) == (0.8, 1.0, 0)


def test_generation_config_penalty_and_length():
    # transformers applies repetition_penalty to greedy decoding too.
    config = resolve({"do_sample": False, "repetition_penalty": 1.05, "max_new_tokens": 64, "top_p": None})
    assert (config.repetition_penalty, config.max_tokens, config.top_p) == (1.05, 64, 1.0)
    assert resolve({"max_new_tokens": 64}, max_tokens=8).max_tokens == 8


def test_bad_generation_config_value_names_its_source():
    with pytest.raises(InvalidArgument, match=r"sampling.top_p=0.*generation_config.json.*set sampling.top_p"):
        resolve({"do_sample": True, "top_p": 0})
    assert resolve({"do_sample": True, "top_p": 0}, top_p=0.5).top_p == 0.5


@pytest.mark.parametrize("field, value, shown", [
    ("temperature", -0.1, "-0.1"), ("temperature", 100.5, "100.5"), ("temperature", math.nan, "nan"),
    ("top_p", 0.0, "0.0"), ("top_p", 1.5, "1.5"), ("top_p", math.nan, "nan"),
    ("min_p", -0.5, "-0.5"), ("min_p", 1.0, "1.0"), ("min_p", math.nan, "nan"),
    ("top_k", 1_000_001, "1000001"),
    ("repetition_penalty", 0.0, "0.0"), ("repetition_penalty", -1.0, "-1.0"),
    ("repetition_penalty", 101.0, "101.0"), ("repetition_penalty", math.nan, "nan"),
    ("max_tokens", 0, "0"), ("max_tokens", 1_000_001, "1000001"),
])
def test_invalid_field(field, value, shown):
    with pytest.raises(InvalidArgument) as err:
        resolve(**{field: value})
    assert f"sampling.{field}={shown} " in err.value.message
    assert "allowed" in err.value.message


def test_limits_are_allowed():
    config = resolve(temperature=100, top_p=1.0, min_p=0.0, top_k=1_000_000, repetition_penalty=100,
                     max_tokens=1_000_000, stop=["x" * 256] * 16, stop_token_ids=[VOCAB - 1])
    assert config.max_tokens == 4096


def test_invalid_stop_strings():
    with pytest.raises(InvalidArgument, match="sampling.stop has 17 strings; at most 16"):
        resolve(stop=["x"] * 17)
    with pytest.raises(InvalidArgument, match="sampling.stop=''.*1 to 256 characters"):
        resolve(stop=["ok", ""])
    with pytest.raises(InvalidArgument, match=r"sampling.stop='yyyy.*\.\.\.'.*1 to 256 characters"):
        resolve(stop=["y" * 257])


def test_invalid_stop_token_ids():
    with pytest.raises(InvalidArgument, match="sampling.stop_token_ids=1000 .*below the vocabulary size 1000"):
        resolve(stop_token_ids=[3, 1000])


# ------------------------------------------------------------------ Sampler

def random_logits(seed: int, n: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 3.0, n).astype(np.float32)


def test_greedy_is_argmax():
    sampler = Sampler(resolve(), VOCAB)
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(np, logits, []) == int(np.argmax(logits))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_low_precision_logits(dtype):
    logits = random_logits(3).astype(dtype)
    assert Sampler(resolve(), VOCAB).sample(np, logits, []) == int(np.argmax(logits.astype(np.float32)))
    token = Sampler(resolve(temperature=1.0, seed=1), VOCAB).sample(np, logits, [])
    assert isinstance(token, int) and 0 <= token < VOCAB


def test_top_k_1_is_greedy():
    config = resolve(temperature=1.5, top_k=1, seed=0)
    for seed in range(20):
        logits = random_logits(seed)
        assert set(draw_many(config, logits, 20)) == {int(np.argmax(logits))}


def test_tiny_temperature_is_greedy():
    logits = random_logits(5)
    assert set(draw_many(resolve(temperature=1e-4, seed=0), logits, 50)) == {int(np.argmax(logits))}


def test_seed_reproducible():
    logits = random_logits(7)
    config = resolve(temperature=1.0, top_p=0.95, seed=1234)
    first, second = draw_many(config, logits, 100), draw_many(config, logits, 100)
    assert first.tolist() == second.tolist()
    other = draw_many(resolve(temperature=1.0, top_p=0.95, seed=1235), logits, 100)
    assert first.tolist() != other.tolist()
    unseeded = [draw_many(resolve(temperature=1.0), logits, 100).tolist() for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_samples_follow_the_distribution():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 20_000
    counts = np.bincount(draw_many(resolve(temperature=1.0, seed=42), np.log(probs).astype(np.float32), n),
                         minlength=len(probs))
    chi_square = float(np.sum((counts - n * probs) ** 2 / (n * probs)))
    assert chi_square < 20.5  # 5 degrees of freedom: p = 0.001


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.6, 0.3, 0.1])).astype(np.float32)
    n = 10_000
    cold = np.bincount(draw_many(resolve(temperature=0.5, seed=1), logits, n), minlength=3) / n
    hot = np.bincount(draw_many(resolve(temperature=2.0, seed=1), logits, n), minlength=3) / n
    expected_cold = np.array([0.36, 0.09, 0.01]) / 0.46  # p ** (1 / 0.5), normalized
    assert np.abs(cold - expected_cold).max() < 0.02
    assert hot[2] > 0.15 > cold[2]


def test_top_k_keeps_the_k_best():
    logits = random_logits(11, 50)
    drawn = set(draw_many(resolve(temperature=5.0, top_k=3, seed=0), logits, 3000))
    assert drawn == set(np.argsort(-logits)[:3].tolist())


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3])).astype(np.float32)
    n = 5000
    # Ranked: 0.5, 0.3, 0.15, 0.05. With top_p 0.7 the mass above 0.15 is 0.8: dropped.
    counts = np.bincount(draw_many(resolve(temperature=1.0, top_p=0.7, seed=3), logits, n), minlength=4)
    assert counts[0] == counts[2] == 0
    assert abs(counts[1] / n - 0.5 / 0.8) < 0.03
    # A tiny top_p still keeps the top token.
    assert set(draw_many(resolve(temperature=1.0, top_p=1e-6, seed=3), logits, 200)) == {1}


def test_min_p_drops_unlikely_tokens():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    # min_p 0.2: threshold 0.2 * 0.5 = 0.1, so only the 0.05 token goes.
    drawn = draw_many(resolve(temperature=1.0, min_p=0.2, seed=4), logits, 5000)
    assert set(drawn) == {0, 1, 2}


def test_filters_combine_in_order():
    logits = np.log(np.array([0.35, 0.25, 0.2, 0.12, 0.08])).astype(np.float32)
    # top_k 4 drops token 4; top_p 0.75 over the renormalized rest (0.38, 0.27, 0.22, 0.13)
    # keeps 0, 1, 2; min_p 0.6 keeps tokens with at least 0.6 * 0.35: 0 and 1.
    drawn = draw_many(resolve(temperature=1.0, top_k=4, top_p=0.75, seed=5), logits, 4000)
    assert set(drawn) == {0, 1, 2}
    drawn = draw_many(resolve(temperature=1.0, top_k=4, top_p=0.75, min_p=0.6, seed=5), logits, 4000)
    assert set(drawn) == {0, 1}


def test_masked_tokens_are_never_drawn():
    logits = np.full(VOCAB, -np.inf, dtype=np.float32)
    logits[[0, 500, VOCAB - 1]] = [1.0, 2.0, 1.5]
    assert set(draw_many(resolve(temperature=1.0, seed=6), logits, 2000)) == {0, 500, VOCAB - 1}


def test_repetition_penalty_changes_argmax():
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[[10, 11, 20, 21]] = [2.0, 1.9, -1.0, -1.2]
    sampler = Sampler(resolve(repetition_penalty=1.5), VOCAB)
    assert sampler.sample(np, logits, []) == 10
    assert sampler.sample(np, logits, [10, 10, 3]) == 11  # 2.0 / 1.5 < 1.9
    only_negative = np.full(VOCAB, -5.0, dtype=np.float32)
    only_negative[[20, 21]] = [-1.0, -1.2]
    assert sampler.sample(np, only_negative, [20]) == 21  # -1.0 * 1.5 < -1.2
    assert logits[10] == 2.0, "the caller's logits must not change"
