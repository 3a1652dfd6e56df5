"""Top-k / top-p / min-p draws without sorting the vocabulary (top_filter.cu): the CuPy launcher and
the NumPy mirror, which is also the definition.

For one row of float32 weights w (exp of the temperature-scaled logits, the top one exactly 1):

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
and the draw by a scan, where a sort of the row (CuPy's argsort of every row, the previous way)
cost a sort of the vocabulary per request per turn.
"""
from __future__ import annotations

import functools
import math

import numpy as np

THREADS = 1024     # one block a row (top_filter.cu's TF_THREADS)


def mass_shift(vocab: int) -> int:
    """S of W = floor(w * 2**S): the largest with vocab * 2**S < 2**62 (w <= 1)."""
    return 62 - int(vocab).bit_length()


def integer_masses(weights: np.ndarray) -> np.ndarray:
    """W of float32 weights in [0, 1] (NaN as 0), int64."""
    w = np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0)
    return np.floor(w.astype(np.float64) * 2.0 ** mass_shift(w.shape[-1])).astype(np.int64)


def top_filter_draw_numpy(weights, top_k, top_p, min_p, uniforms) -> np.ndarray:
    """int64 [R]: each row's draw under the definition above. weights float32 [R, vocab]; top_k
    int [R] (0: none), top_p [R] (1: none), min_p [R] (0: none), uniforms [R] in [0, 1)."""
    weights = np.nan_to_num(np.asarray(weights, dtype=np.float32), nan=0.0)
    masses = integer_masses(weights)
    out = np.zeros(len(weights), dtype=np.int64)
    for r, (w, mass) in enumerate(zip(weights, masses)):
        ranked = np.argsort(-w, kind="stable")           # high to low, ties in id order
        if 0 < top_k[r] < len(w):
            ranked = ranked[:top_k[r]]
        if top_p[r] < 1.0:
            ranked_mass = mass[ranked]
            total = int(ranked_mass.sum())
            if total > 0:
                above = np.cumsum(ranked_mass) - ranked_mass
                ranked = ranked[above < min(math.ceil(float(top_p[r]) * float(total)), total)]
        kept = np.zeros(len(w), dtype=bool)
        kept[ranked] = True
        if min_p[r] > 0.0:
            kept &= w >= np.float32(min_p[r])
        kept_mass = np.where(kept, mass, 0)
        total = int(kept_mass.sum())
        if total == 0:       # nothing has weight (NaN or underflow everywhere): the top-ranked id
            out[r] = int(np.argsort(-w, kind="stable")[0])
            continue
        target = min(max(math.ceil((1.0 - float(uniforms[r])) * float(total)), 1), total)
        out[r] = int(np.searchsorted(np.cumsum(kept_mass), target, side="left"))
    return out


@functools.lru_cache(maxsize=None)
def _kernel(device: int):
    from common.dtypes import KERNEL_CODES
    from neuron.kernels import load_module
    module = load_module("top_filter.cu", KERNEL_CODES["float32"], f"-DTF_THREADS={THREADS}")
    return module.get_function("top_filter_draw")


def top_filter_draw_cuda(weights, top_k, top_p, min_p, uniforms):
    """top_filter_draw_numpy on the device: int64 [R] there, no copy back. `weights` a CuPy float32
    [R, vocab] array; the other arguments host sequences of R."""
    import cupy

    weights = cupy.ascontiguousarray(weights, dtype=cupy.float32)
    rows, vocab = weights.shape
    out = cupy.empty(rows, dtype=cupy.int64)
    if rows:
        params = cupy.asarray(np.stack([np.asarray(top_k, dtype=np.float64), np.asarray(top_p, dtype=np.float64),
                                        np.asarray(min_p, dtype=np.float64), np.asarray(uniforms, dtype=np.float64)],
                                       axis=1))
        _kernel(cupy.cuda.runtime.getDevice())((rows,), (THREADS,),
                                               (weights, np.int32(vocab), np.int32(mass_shift(vocab)), params, out))
    return out


def top_filter_draw(xp, weights, top_k, top_p, min_p, uniforms):
    """The draws on the weights' device: int64 [R], a NumPy array or a CuPy one (not copied back)."""
    if xp is np:
        return top_filter_draw_numpy(weights, top_k, top_p, min_p, uniforms)
    return top_filter_draw_cuda(weights, top_k, top_p, min_p, uniforms)
