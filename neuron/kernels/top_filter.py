"""The sampler's draws (top_filter.cu): temperature, top-k / top-p / min-p and the draw, without
sorting the vocabulary; the CuPy launchers and the NumPy mirror, which is also the definition.

A row of float32 scores s (logits after the repetition penalty) becomes weights
w = exp((s - max s) / temperature) in float32 (the top one exactly 1; NaN scores weigh 0, the max
ignores them). Then:

1. Rank the ids by w, high to low, ties in id order (NaN counts as 0).
2. top-k keeps the first k ranked ids (k 0: all).
3. top-p keeps, of those, the ranked prefix in which the mass ranked above each id is below
   min(ceil(top_p * total), total), with total the mass of those ids (the top id always stays).
4. min-p keeps those with w >= min_p (relative to the top weight, 1).
5. The draw walks the kept ids in vocabulary order: the first whose running mass reaches
   ceil((1 - u) * total).

Masses are integers, W = floor(w * 2**S) with S = 62 - bit_length(vocab), so every sum is exact
in int64 and the same in any order: the kernel adds them in parallel and gets the mirror's bits. An
id whose weight is below 2**-S of the top one (about 3e-14 at a 128k vocabulary) has W = 0 and is
never drawn. The kernel finds the cuts of steps 2 and 3 by radix selection over the weights' bits
and the draw by a scan; sorting every row with top-k or top-p (the previous way) cost 18 ms a turn
at 256 rows of a 128k vocabulary on the H200 against 1.4 now (bench/sampler_bench.py).
"""
from __future__ import annotations

import functools
import math

import numpy as np

THREADS = 1024     # one block a row (top_filter.cu's TF_THREADS)
PARAMS = 5         # per row: top_k, top_p, min_p, uniform, temperature (float64)


def mass_shift(vocab: int) -> int:
    """S of W = floor(w * 2**S): the largest with vocab * 2**S < 2**62 (w <= 1)."""
    return 62 - int(vocab).bit_length()


def integer_masses(weights: np.ndarray) -> np.ndarray:
    """W of float32 weights in [0, 1] (NaN as 0), int64."""
    return _masses(np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0))


def _masses(w: np.ndarray) -> np.ndarray:   # w float32 without NaN
    return np.floor(w.astype(np.float64) * 2.0 ** mass_shift(w.shape[-1])).astype(np.int64)


def sample_weights_numpy(scores, temperature) -> np.ndarray:
    """float32 [R, vocab]: exp((s - max s) / temperature) per row, the max ignoring NaN."""
    scores = np.asarray(scores, dtype=np.float32)
    top = np.fmax.reduce(scores, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.exp((scores - top) / np.asarray(temperature, dtype=np.float32)[:, None])


def top_filter_draw_numpy(weights, top_k, top_p, min_p, uniforms) -> np.ndarray:
    """int64 [R]: each row's draw under the definition above. weights float32 [R, vocab]; top_k
    int [R] (0: none), top_p [R] (1: none), min_p [R] (0: none), uniforms [R] in [0, 1)."""
    weights = np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0)
    masses = _masses(weights)
    out = np.zeros(len(weights), dtype=np.int64)
    for r, (w, mass) in enumerate(zip(weights, masses)):
        cut_k, cut_p = 0 < top_k[r] < len(w), top_p[r] < 1.0
        kept = None   # every id
        if cut_k or cut_p:   # only a cut needs the ranking (a sort of the row, on the CPU)
            ranked = np.argsort(-w, kind="stable")       # high to low, ties in id order
            if cut_k:
                ranked = ranked[:top_k[r]]
            if cut_p:
                ranked_mass = mass[ranked]
                total = int(ranked_mass.sum())
                if total > 0:
                    above = np.cumsum(ranked_mass) - ranked_mass
                    ranked = ranked[above < min(math.ceil(float(top_p[r]) * float(total)), total)]
            kept = np.zeros(len(w), dtype=bool)
            kept[ranked] = True
        if min_p[r] > 0.0:
            above_min = w >= np.float32(min_p[r])
            kept = above_min if kept is None else kept & above_min
        kept_mass = mass if kept is None else np.where(kept, mass, 0)
        total = int(kept_mass.sum())
        if total == 0:       # nothing has weight (NaN or underflow everywhere): the top-ranked id
            out[r] = int(np.argmax(w))                   # the first of the largest
            continue
        target = min(max(math.ceil((1.0 - float(uniforms[r])) * float(total)), 1), total)
        out[r] = int(np.searchsorted(np.cumsum(kept_mass), target, side="left"))
    return out


def _params(top_k, top_p, min_p, uniforms, temperature) -> np.ndarray:
    columns = (top_k, top_p, min_p, uniforms, temperature)
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)


@functools.lru_cache(maxsize=None)
def _kernels(device: int):
    from common.dtypes import KERNEL_CODES
    from neuron.kernels import load_module
    module = load_module("top_filter.cu", KERNEL_CODES["float32"], f"-DTF_THREADS={THREADS}",
                         f"-DTF_PARAMS={PARAMS}")
    return module.get_function("sample_weights"), module.get_function("top_filter_draw")


def _weigh(scores, params):
    """sample_weights.cu over CuPy float32 scores [R, vocab] with device params [R, PARAMS]."""
    import cupy

    rows, vocab = scores.shape
    weights = cupy.empty_like(scores)
    _kernels(cupy.cuda.runtime.getDevice())[0]((rows,), (THREADS,), (scores, np.int32(vocab), params, weights))
    return weights


def _draw(weights, params):
    """top_filter_draw.cu over CuPy float32 weights [R, vocab] with device params [R, PARAMS]."""
    import cupy

    rows, vocab = weights.shape
    out = cupy.empty(rows, dtype=cupy.int64)
    _kernels(cupy.cuda.runtime.getDevice())[1]((rows,), (THREADS,),
                                               (weights, np.int32(vocab), np.int32(mass_shift(vocab)), params, out))
    return out


def top_filter_draw_cuda(weights, top_k, top_p, min_p, uniforms):
    """top_filter_draw_numpy on the device: int64 [R] there, no copy back. `weights` a CuPy float32
    [R, vocab] array; the other arguments host sequences of R."""
    import cupy

    weights = cupy.ascontiguousarray(weights, dtype=cupy.float32)
    if not len(weights):
        return cupy.empty(0, dtype=cupy.int64)
    return _draw(weights, cupy.asarray(_params(top_k, top_p, min_p, uniforms, np.ones(len(weights)))))


def sample_weights_cuda(scores, temperature):
    """sample_weights_numpy on the device (expf may differ from NumPy's exp in the last bit)."""
    import cupy

    scores = cupy.ascontiguousarray(scores, dtype=cupy.float32)
    if not len(scores):
        return cupy.empty_like(scores)
    rows = len(scores)
    return _weigh(scores, cupy.asarray(_params(np.zeros(rows), np.ones(rows), np.zeros(rows), np.zeros(rows),
                                               temperature)))


def sample_draws(xp, scores, top_k, top_p, min_p, temperature, uniforms):
    """Each row's drawn id, int64 [R] on the scores' device (not copied back): weights, filters and
    draw as defined above. scores float32 [R, vocab]; the rest host sequences of R (top_k 0: none,
    top_p 1: none, min_p 0: none, temperature > 0, uniforms in [0, 1))."""
    if xp is np:
        return top_filter_draw_numpy(sample_weights_numpy(scores, temperature), top_k, top_p, min_p, uniforms)
    scores = xp.ascontiguousarray(scores, dtype=xp.float32)
    if not len(scores):
        return xp.empty(0, dtype=xp.int64)
    params = xp.asarray(_params(top_k, top_p, min_p, uniforms, temperature))   # the turn's one upload
    return _draw(_weigh(scores, params), params)
