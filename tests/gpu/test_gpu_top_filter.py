"""top_filter.cu against its NumPy mirror on the same weights: the same id for every row (ties across
the cuts, NaN, underflow, top-k and top-p together, vocabularies up to Qwen's), whatever the rows
launched beside it."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

from neuron.kernels.top_filter import (  # noqa: E402
    sample_draws,
    sample_weights_cuda,
    sample_weights_numpy,
    top_filter_draw_cuda,
    top_filter_draw_numpy,
)


def weights_for(rng, rows: int, vocab: int) -> np.ndarray:
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * rng.uniform(0.5, 8, (rows, 1)).astype(np.float32)
    logits[::3] = np.round(logits[::3] * 2) / 2                 # ties everywhere, across the cuts
    if rows > 2:
        logits[1, : vocab // 2] = logits[1, :1]                  # a tie block
        logits[2, :] = -200.0
        logits[2, 7 % vocab] = 0.0                               # one id, the rest underflow to 0
    w = np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float32)
    if rows > 4:
        w[4, vocab // 3] = np.nan
    return w


@pytest.mark.parametrize("vocab", [1, 5, 300, 4099, 32000, 128256, 151936])
def test_kernel_equals_the_mirror(vocab):
    rng = np.random.default_rng(vocab)
    rows = 40
    w = weights_for(rng, rows, vocab)
    device = cp.asarray(w)
    for trial in range(4):
        top_k = rng.choice([0, 1, 2, 20, 50, vocab - 1, vocab], rows)
        top_p = rng.choice([1.0, 0.95, 0.9, 0.5, 1e-9], rows)
        min_p = rng.choice([0.0, 0.0, 0.05], rows)
        u = rng.random(rows)
        u[::7] = 0.0
        expected = top_filter_draw_numpy(w, top_k, top_p, min_p, u)
        got = top_filter_draw_cuda(device, top_k, top_p, min_p, u).get()
        assert got.tolist() == expected.tolist(), (vocab, trial)
        # each row alone gives its batched id
        for r in (0, 1, 2, 4, rows - 1):
            alone = top_filter_draw_cuda(device[r:r + 1], top_k[r:r + 1], top_p[r:r + 1], min_p[r:r + 1], u[r:r + 1])
            assert int(alone.get()[0]) == int(expected[r])


@pytest.mark.parametrize("vocab", [7, 4099, 128256])
def test_weights_and_the_whole_draw(vocab):
    """sample_weights.cu within expf's last bits of NumPy's exp (NaN, -inf and +inf scores too), and
    sample_draws on the device equal to the mirror's filters on the device's weights."""
    rng = np.random.default_rng(vocab + 1)
    rows = 24
    scores = (rng.standard_normal((rows, vocab)) * 4).astype(np.float32)
    scores[1, 0] = np.nan
    scores[2, :] = -np.inf
    scores[2, vocab // 2] = 1.0
    scores[3, vocab - 1] = np.inf
    temperature = rng.choice([0.3, 0.7, 1.0, 1.7], rows)
    device = cp.asarray(scores)
    w = sample_weights_cuda(device, temperature).get()
    np.testing.assert_allclose(w, sample_weights_numpy(scores, temperature), rtol=1e-6, atol=1e-37)
    top_k = rng.choice([0, 0, 1, 40], rows)
    top_p = rng.choice([1.0, 0.9, 0.6], rows)
    min_p = rng.choice([0.0, 0.1], rows)
    u = rng.random(rows)
    got = sample_draws(cp, device, top_k, top_p, min_p, temperature, u).get()
    assert got.tolist() == top_filter_draw_numpy(w, top_k, top_p, min_p, u).tolist()
