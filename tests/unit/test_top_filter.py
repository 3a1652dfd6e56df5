"""The sort-free top-k / top-p / min-p draw (neuron/kernels/top_filter): its NumPy mirror against
the kernel's algorithm done step by step in Python (radix selection over the weights' bits, scans
in id order), which is what top_filter.cu runs; and the mirror's draws against what the filters
mean (the kept set, each kept id drawn in proportion to its weight)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from neuron.kernels.top_filter import integer_masses, mass_shift, top_filter_draw_numpy


def kernel_steps(w: np.ndarray, top_k: int, top_p: float, min_p: float, u: float) -> int:
    """top_filter.cu's algorithm for one row, in Python: cuts as (key, last id), found by 8-bit
    radix selection and scans in id order."""
    w = np.nan_to_num(w.astype(np.float32), nan=0.0)
    keys = w.view(np.uint32).astype(np.int64)
    mass = integer_masses(w)
    ids = np.arange(len(w))
    vocab = len(w)

    def has(cut, i_keys, i_ids):
        key, last = cut
        return (i_keys > key) | ((i_keys == key) & (i_ids <= last))

    def radix_select(values, in_range, target):
        prefix, above, equal = 0, 0, 0
        for shift in (24, 16, 8, 0):
            high = 0 if shift == 24 else (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
            sel = in_range & ((keys & high) == prefix)
            hist = np.zeros(256, dtype=np.int64)
            np.add.at(hist, (keys[sel] >> shift) & 255, 1 if values is None else values[sel])
            run = above
            for b in range(255, -1, -1):
                if run + hist[b] >= target:
                    prefix, above, equal = prefix | (b << shift), run, int(hist[b])
                    break
                run += int(hist[b])
        return prefix, above, equal

    def find_nth(values, target):
        run = np.cumsum(values)
        hit = np.flatnonzero(run >= target)
        return int(hit[0]) if len(hit) else vocab - 1

    all_ids = (0, vocab - 1)
    k_cut = all_ids
    if 0 < top_k < vocab:
        key, above, _ = radix_select(None, np.ones(vocab, bool), top_k)
        k_cut = (key, find_nth((keys == key).astype(np.int64), top_k - above))
    p_cut = all_ids
    in_k = has(k_cut, keys, ids)
    if top_p < 1.0:
        total = int(mass[in_k].sum())
        if total > 0:
            target = min(math.ceil(top_p * float(total)), total)
            key, above, equal = radix_select(mass, in_k, target)
            tie = int(np.floor(np.float64(np.uint32(key).view(np.float32)) * 2.0 ** mass_shift(vocab)))
            last = vocab - 1
            if tie > 0:
                keep = min(equal // tie, (target - above + tie - 1) // tie)
                last = find_nth((keys == key).astype(np.int64), keep)
            p_cut = (key, last)
    kept = in_k & has(p_cut, keys, ids) & (w >= np.float32(min_p if min_p > 0 else 0.0))
    kept_mass = np.where(kept, mass, 0)
    total = int(kept_mass.sum())
    if total == 0:
        return find_nth((keys == keys.max()).astype(np.int64), 1)
    target = min(max(math.ceil((1.0 - u) * float(total)), 1), total)
    return find_nth(kept_mass, target)


def random_rows(rng, rows: int, vocab: int) -> np.ndarray:
    """Weights as the sampler makes them (exp of scaled logits, top 1), many of them tied."""
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * rng.uniform(0.5, 8, (rows, 1)).astype(np.float32)
    logits[::3] = np.round(logits[::3])                       # ties everywhere, across the cuts
    logits[1::4, : vocab // 2] = logits[1::4, :1]             # a tie block at the top
    if rows > 2:
        logits[2, :] = -200.0
        logits[2, 7 % vocab] = 0.0                            # one id, the rest underflow to 0
    return np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("vocab", [1, 5, 300, 4099])
def test_mirror_equals_the_kernel_steps(vocab):
    rng = np.random.default_rng(vocab)
    weights = random_rows(rng, 24, vocab)
    weights[5, vocab // 2] = np.nan
    settings = [(k, p, m) for k in (0, 1, 2, 37, vocab - 1, vocab) for p in (1.0, 0.9, 0.5, 1e-9)
                for m in (0.0, 0.05)]
    for j, (k, p, m) in enumerate(settings):
        rows = [(j + r) % len(weights) for r in range(3)]
        u = rng.random(3)
        u[0] = 0.0 if j % 5 == 0 else u[0]
        got = top_filter_draw_numpy(weights[rows], [k] * 3, [p] * 3, [m] * 3, u)
        for r, row in enumerate(rows):
            assert got[r] == kernel_steps(weights[row], k, p, m, u[r]), (k, p, m, row)


def kept_set(w: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """What the filters keep, by the definition, with the ranking written out."""
    ranked = sorted(range(len(w)), key=lambda i: (-w[i], i))
    if 0 < top_k < len(w):
        ranked = ranked[:top_k]
    mass = integer_masses(w)
    if top_p < 1.0:
        total = int(sum(mass[i] for i in ranked))
        bound = min(math.ceil(top_p * float(total)), total)
        kept, above = [], 0
        for i in ranked:
            if above < bound:
                kept.append(i)
            above += int(mass[i])
        ranked = kept
    return {i for i in ranked if w[i] >= np.float32(min_p)}


def test_draws_follow_the_kept_weights():
    """Over evenly spaced uniforms each kept id is drawn in proportion to its integer mass and no
    other id is drawn at all."""
    rng = np.random.default_rng(7)
    w = random_rows(rng, 1, 200)[0]
    draws = 4000
    for k, p, m in [(0, 0.8, 0.0), (20, 1.0, 0.0), (50, 0.7, 0.01), (1, 1.0, 0.0)]:
        kept = kept_set(w, k, p, m)
        u = (np.arange(draws) + 0.5) / draws
        got = top_filter_draw_numpy(np.repeat(w[None], draws, 0), [k] * draws, [p] * draws, [m] * draws, u)
        assert set(got.tolist()) <= kept
        mass = integer_masses(w)
        total = sum(int(mass[i]) for i in kept)
        counts = np.bincount(got, minlength=len(w))
        for i in kept:
            assert abs(counts[i] / draws - mass[i] / total) <= 1.0 / draws + 1e-12


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    rng = np.random.default_rng(3)
    weights = random_rows(rng, 12, 1000)
    greedy = np.argmax(weights, axis=1)
    u = rng.random(12)
    assert top_filter_draw_numpy(weights, [1] * 12, [1.0] * 12, [0.0] * 12, u).tolist() == greedy.tolist()
    assert top_filter_draw_numpy(weights, [0] * 12, [1e-12] * 12, [0.0] * 12, u).tolist() == greedy.tolist()


def test_kept_set_is_the_sorted_nucleus():
    """Away from ties, the kept set is the sorted-cumsum nucleus the sampler used before (floats)."""
    rng = np.random.default_rng(11)
    w = np.exp(rng.standard_normal(5000).astype(np.float32) * 3)
    w = (w / w.max()).astype(np.float32)
    for p in (0.5, 0.9, 0.99):
        order = np.argsort(-w, kind="stable")
        sorted_w = w[order].astype(np.float64)
        cumulative = np.cumsum(sorted_w)
        before = set(order[(cumulative - sorted_w) < p * cumulative[-1]].tolist())
        assert kept_set(w, 0, p, 0.0) == before


def test_masses_are_exact_in_int64():
    assert mass_shift(128256) == 45 and 128256 * 2 ** 45 < 2 ** 62
    w = np.ones(128256, dtype=np.float32)
    assert int(integer_masses(w).sum()) == 128256 * 2 ** 45


def test_weights_ignore_nan_and_the_draw_never_picks_it():
    from neuron.kernels.top_filter import sample_draws, sample_weights_numpy
    scores = np.array([[np.nan, 1.0, 3.0, -np.inf, 3.0], [np.nan] * 5], dtype=np.float32)
    w = sample_weights_numpy(scores, [0.5, 1.0])
    assert w[0, 2] == w[0, 4] == 1.0 and w[0, 3] == 0.0 and np.isnan(w[0, 0])
    u = np.linspace(0, 0.999, 50)
    for top_p in (1.0, 0.9):
        drawn = {int(sample_draws(np, scores[:1], [0], [top_p], [0.0], [0.5], [x])[0]) for x in u}
        assert drawn <= {1, 2, 4} and {2, 4} <= drawn
    assert int(sample_draws(np, scores[1:], [0], [1.0], [0.0], [1.0], [0.3])[0]) == 0   # nothing weighs: id 0
