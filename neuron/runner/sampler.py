"""The batched sampler: one call picks the next token of every request of the turn.

Each request's tokens do not depend on what else is in the batch: its row is penalised and filtered
on its own, greedy rows share one argmax (exact, whatever the batch), and a sampling row draws from
the request's own host random stream, PCG64 seeded per request with one uniform per sampled token,
the same stream neuron/sampling.py's Sampler uses. The logits stay on the device; only the chosen
ids come back to the host, in one copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuron.kernels.argmax import argmax_rows_cuda
from neuron.kernels.top_filter import sample_draws
from neuron.sampling import SamplingConfig, _penalize_repetition

from .batch import is_range


@dataclass
class RowSampler:
    """A request's sampling state, kept on Request.sampler_state across turns (and preemptions)."""
    config: SamplingConfig
    top_k: int                         # 0 when it would keep the whole vocabulary (no sort)
    rng: np.random.Generator

    @classmethod
    def create(cls, config: SamplingConfig, vocab_size: int) -> "RowSampler":
        top_k = config.top_k if config.top_k < vocab_size else 0
        return cls(config, top_k, np.random.Generator(np.random.PCG64(config.seed)))  # seed None: OS entropy


@dataclass(slots=True)  # one per sampling request per turn
class SampleRow:
    sampler: RowSampler
    row: int                           # index into the turn's logits
    history: list[int]                 # prompt + output ids (for the repetition penalty)


def sample_rows(xp, logits, rows: list[SampleRow]) -> list[int]:
    """Token ids for `rows` of float32 logits [R, vocab], in the order of `rows`."""
    ids = sample_rows_on_device(xp, logits, rows)
    return [int(t) for t in (ids if isinstance(ids, np.ndarray) else ids.get())]  # the turn's one copy back


def sample_rows_on_device(xp, logits, rows: list[SampleRow]):
    """sample_rows' ids as an int64 array on the logits' device, not yet copied back (no sync): a
    turn launched ahead takes its tokens from it there."""
    if not rows:
        return xp.zeros(0, dtype=xp.int64)
    row_index = np.asarray([r.row for r in rows], dtype=np.int64)
    if all(r.sampler.config.plain_greedy for r in rows):
        return greedy_rows(xp, logits, row_index)
    row_index = xp.asarray(row_index)
    scores = logits[row_index].astype(xp.float32, copy=False)   # a gathered copy: penalties write into it
    for j, r in enumerate(rows):
        penalty = r.sampler.config.repetition_penalty
        if penalty != 1.0 and r.history:
            row = scores[j]  # a view: the penalty is written in place
            _penalize_repetition(xp, row, r.history, penalty)
    greedy = [j for j, r in enumerate(rows) if r.sampler.config.greedy]
    if not greedy:   # every row draws (an OpenAI client's default): no second gather, no scatter
        return draw_rows(xp, scores, [r.sampler for r in rows])
    ids = xp.zeros(len(rows), dtype=xp.int64)
    if len(greedy) == len(rows):
        ids = xp.argmax(scores, axis=-1)
    elif greedy:
        index = xp.asarray(np.asarray(greedy, dtype=np.int64))
        ids[index] = xp.argmax(scores[index], axis=-1)
    drawn = [j for j, r in enumerate(rows) if not r.sampler.config.greedy]
    if drawn:
        index = xp.asarray(np.asarray(drawn, dtype=np.int64))
        ids[index] = draw_rows(xp, scores[index], [rows[j].sampler for j in drawn])
    return ids


def greedy_rows(xp, logits, rows: np.ndarray):
    """The first maximum of each of `rows` of float32 logits [R, vocab], int64 on the logits'
    device: every row greedy (the common batch), one kernel over the logits in place on a GPU,
    no gathered copy. Exact, so a row's id does not depend on the others."""
    if not len(rows):
        return xp.zeros(0, dtype=xp.int64)
    if xp is np:
        return np.argmax(logits[rows], axis=-1).astype(np.int64)
    if isinstance(rows, np.ndarray) and is_range(rows):
        on_device = _device_range(xp, len(rows))
        if on_device is not None:
            return argmax_rows_cuda(logits, on_device)   # no upload
    return argmax_rows_cuda(logits, xp.asarray(rows))


_ranges: dict[tuple[int, int], object] = {}


def _device_range(cp, n: int):
    """0..n-1 as int64 on the current device: the rows of a turn whose every row samples (every
    decode turn), uploaded once per size instead of every turn. None while the stream is being
    captured: made there, the array would hold nothing until the graph ran."""
    key = (cp.cuda.runtime.getDevice(), n)
    found = _ranges.get(key)
    if found is None:
        if cp.cuda.get_current_stream().is_capturing():
            return None
        found = _ranges.setdefault(key, cp.arange(n, dtype=cp.int64))
    return found


def draw_rows(xp, scores, samplers: list[RowSampler]):
    """neuron.sampling.draw for every row of float32 scores [n, vocab] at once, each with its
    request's config and next uniform: the same token per row as `draw` on that row alone (CPU
    tests hold it exactly), in two launches per turn on a GPU (top_filter.cu), no sort."""
    uniforms = np.array([s.rng.random() for s in samplers])   # one per row per token, in row order
    return sample_draws(xp, scores, [s.top_k for s in samplers], [s.config.top_p for s in samplers],
                        [s.config.min_p for s in samplers], [s.config.temperature for s in samplers], uniforms)
