"""A generating sequence and how the device worker advances it one step at a time.

The worker owns the Sequence while it runs; the gRPC side only reads events (token, finish, error)
that the worker posts to it, and may set `cancelled`, which the worker honours before the next step.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    # When the token was sampled (time.perf_counter on the device thread): TTFT and decode rate are
    # measured from these, not from when the caller happened to read the event.
    sampled_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class FinishEvent:
    reason: str          # "stop" or "length"
    stop_reason: str     # "eos", "stop_token:ID", "max_tokens", "context", "cancelled"


@dataclass(frozen=True)
class ErrorEvent:
    error: Exception


@dataclass
class Sequence:
    handle: int
    prompt_ids: list[int]
    sampling: SamplingConfig
    emit: Callable[[object], None]          # thread-safe: posts an event to the caller
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    position: int = 0                        # tokens whose KV is in the cache
    generated: list[int] = field(default_factory=list)
    sampler: Sampler | None = None

    def cancel(self) -> None:
        self.cancelled.set()


def advance(shard, seq: Sequence) -> bool:
    """Run one forward step (the whole prompt first, then one token) and sample one token.
    Returns True when the sequence has finished (its finish event is already posted)."""
    if seq.position == 0:
        feed = seq.prompt_ids
        seq.sampler = Sampler(seq.sampling, shard.config.vocab_size)
    else:
        feed = seq.generated[-1:]
    token = shard.next_token(feed, seq.position, seq.slot, seq.sampler, lambda: seq.prompt_ids + seq.generated,
                             more=len(seq.generated) + 1 < seq.sampling.max_tokens)
    seq.position += len(feed)
    seq.generated.append(token)
    seq.emit(TokenEvent(token))
    finish = _finish_reason(shard, seq, token)
    if finish:
        seq.emit(FinishEvent(*finish))
        return True
    return False


def _finish_reason(shard, seq: Sequence, token: int) -> tuple[str, str] | None:
    cfg = seq.sampling
    if token in cfg.stop_token_ids:
        return "stop", f"stop_token:{token}"
    if not cfg.ignore_eos and token in shard.eos_ids():
        return "stop", "eos"
    if len(seq.generated) >= cfg.max_tokens:
        return "length", cfg.length_limit
    if seq.position >= shard.kv.max_context:
        return "length", "context"
    return None
