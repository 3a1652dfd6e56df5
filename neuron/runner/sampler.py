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

from neuron.sampling import SamplingConfig, _inverse_cdf, _penalize_repetition, _top_p


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


@dataclass(frozen=True)
class SampleRow:
    sampler: RowSampler
    row: int                           # index into the turn's logits
    history: list[int]                 # prompt + output ids (for the repetition penalty)


def sample_rows(xp, logits, rows: list[SampleRow]) -> list[int]:
    """Token ids for `rows` of float32 logits [R, vocab], in the order of `rows`."""
    if not rows:
        return []
    scores = logits[xp.asarray(np.asarray([r.row for r in rows], dtype=np.int64))].astype(xp.float32)
    for j, r in enumerate(rows):
        penalty = r.sampler.config.repetition_penalty
        if penalty != 1.0 and r.history:
            row = scores[j]  # a view: the penalty is written in place
            _penalize_repetition(xp, row, r.history, penalty)
    greedy = [j for j, r in enumerate(rows) if r.sampler.config.greedy]
    ids = xp.zeros(len(rows), dtype=xp.int64)
    if len(greedy) == len(rows):
        ids = xp.argmax(scores, axis=-1)
    elif greedy:
        index = xp.asarray(np.asarray(greedy, dtype=np.int64))
        ids[index] = xp.argmax(scores[index], axis=-1)
    for j, r in enumerate(rows):
        if not r.sampler.config.greedy:
            ids[j] = _draw(xp, scores[j], r.sampler)
    host = ids if isinstance(ids, np.ndarray) else ids.get()  # the turn's one copy back
    return [int(t) for t in host]


def _draw(xp, scores, sampler: RowSampler):
    """A device scalar: temperature, then transformers' filter order top-k, top-p, min-p, then an
    inverse-CDF draw with the request's next uniform."""
    config = sampler.config
    scores = (scores - scores.max()) / config.temperature
    order = None
    if sampler.top_k or config.top_p < 1.0:
        order = xp.argsort(-scores, kind="stable")  # high to low; ties keep vocab order
        if sampler.top_k:
            order = order[:sampler.top_k]
        scores = scores[order]
    weights = xp.exp(scores)  # unnormalized; the top token's weight is exactly 1
    if config.top_p < 1.0:
        weights = _top_p(xp, weights, config.top_p)
    if config.min_p > 0.0:
        weights = xp.where(weights >= config.min_p, weights, 0.0)
    index = _inverse_cdf(xp, weights, sampler.rng.random())
    return order[index] if order is not None else index
