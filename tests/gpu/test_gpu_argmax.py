"""argmax.cu against cupy.argmax (the sampler's previous greedy pick): ties, NaN, -inf rows, row order."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy")

from neuron.kernels.argmax import argmax_rows_cuda, argmax_rows_numpy  # noqa: E402


@pytest.mark.parametrize("vocab", [1, 31, 1000, 4096, 4097, 12289, 128256])   # one chunk, chunk edges, many
def test_argmax_rows_equals_cupy_argmax(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((9, vocab)).astype(np.float32)
    logits[1] = 0.5                                  # ties everywhere: the first index wins
    logits[2] = -np.inf                              # nothing finite
    if vocab > 3:
        logits[3, [2, vocab - 1]] = np.nan           # the first NaN wins
        logits[4, vocab // 2] = logits[4, vocab // 3] = 100.0
    device = cp.asarray(logits)
    rows = np.array([8, 0, 1, 2, 3, 4, 4, 7], dtype=np.int64)
    got = argmax_rows_cuda(device, cp.asarray(rows)).get()
    expected = cp.argmax(device[cp.asarray(rows)], axis=-1).get()
    assert got.tolist() == expected.tolist() == argmax_rows_numpy(logits, rows).tolist()
