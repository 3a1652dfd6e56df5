"""A request as the engine sees it: the tokens it knows, how many of them have their KV computed, and
the KV blocks that hold them.

There is no prefill or decode phase. Each turn the scheduler gives a request some of its uncomputed
tokens (`num_tokens - num_computed_tokens`); a fresh prompt, a chunk of a long prompt, one decode
token, a prefix-cache hit (computed tokens start above zero) and a recompute after preemption are all
that one rule.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from neuron.sampling import SamplingConfig


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # not yet given blocks (new, or preempted and waiting to recompute)
    RUNNING = "running"          # holds blocks; scheduled every turn until it finishes
    FINISHED = "finished"        # see Request.finish_reason / stop_reason


@dataclass(eq=False)  # identity equality: two requests with the same tokens are still two requests
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_context: int                         # positions the shard's KV can hold for one request
    eos_ids: frozenset[int] = frozenset()
    # A scoring (Forward) request: run the prompt, return logits, sample nothing.
    want_logits: bool = False
    all_positions: bool = False              # with want_logits: every position's logits, else the last
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0             # tokens whose KV is in this request's blocks
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None         # "stop" | "length" | "abort" | "error"
    stop_reason: str = ""                    # "eos", "stop_token:ID", "max_tokens", "context", ...
    sampler_state: Any = None                # the runner's per-request sampling state (its random stream)
    # Prefix-cache hash of each full block of all_token_ids, in order; filled by the KV block manager.
    # Tokens are only ever appended, so a hash once computed stays valid (across preemptions too).
    block_hashes: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
