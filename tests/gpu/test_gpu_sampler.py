"""The batched sampler's draws on a GPU (draw_rows on CuPy): each row's token is the same drawn with
the whole batch as drawn alone, and the same as the NumPy per-request sampler's on those logits."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

from neuron.runner.sampler import RowSampler, SampleRow, sample_rows  # noqa: E402
from neuron.sampling import Sampler, SamplingConfig  # noqa: E402

SETTINGS = [
    dict(temperature=0.8, seed=1),
    dict(temperature=1.0, top_k=5, seed=2),
    dict(temperature=0.7, top_p=0.8, seed=3),
    dict(temperature=1.2, min_p=0.1, seed=4),
    dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=5),
    dict(temperature=0.0),
]


@pytest.mark.parametrize("vocab", [300, 128256])
def test_batched_draws_on_the_gpu_equal_alone_and_the_numpy_sampler(vocab):
    rng = np.random.default_rng(vocab)
    batched_samplers = [RowSampler.create(SamplingConfig(**s), vocab) for s in SETTINGS]
    alone_samplers = [RowSampler.create(SamplingConfig(**s), vocab) for s in SETTINGS]
    singles = [Sampler(SamplingConfig(**s), vocab) for s in SETTINGS]
    histories = [list(rng.integers(0, vocab, 10)) for _ in SETTINGS]
    for _ in range(8):
        logits = rng.normal(0, 3, (len(SETTINGS), vocab)).astype(np.float32)
        device = cp.asarray(logits)
        rows = [SampleRow(batched_samplers[i], i, histories[i]) for i in range(len(SETTINGS))]
        batched = sample_rows(cp, device, rows)
        alone = [sample_rows(cp, device, [SampleRow(alone_samplers[i], i, histories[i])])[0]
                 for i in range(len(SETTINGS))]
        # NumPy and CuPy may sum a float64 CDF in other orders: a draw could differ only where its
        # uniform falls within that rounding of a boundary
        reference = [singles[i].sample(np, logits[i], histories[i]) for i in range(len(SETTINGS))]
        assert batched == alone
        assert batched == reference
        for i, token in enumerate(batched):
            histories[i].append(token)
