"""The events the device thread posts to a Generate caller: tokens as they are sampled, then a
finish or an error. The gRPC side only reads them (see neuron/engine/core.py for who posts)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)  # one per token
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
