"""The plain data that crosses the engine's seams each turn:
`plan = scheduler.schedule()` -> `out = runner.execute(plan)` -> `scheduler.update(plan, out)`."""
from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass(slots=True)  # one per request per turn: slots, not frozen (4x cheaper to build)
class ScheduledChunk:
    """One request's share of a turn: compute KV for `token_ids` at positions start.. and, when the
    chunk reaches the last known token, sample the next one (or return logits for a scoring request)."""
    request: Request
    token_ids: list[int]
    start: int                 # position of token_ids[0] (= the request's num_computed_tokens)
    # the request's whole block table, covering start + len(token_ids) tokens: the request's own
    # list, not a copy (read by build_batch when the plan launches, right after it is made; blocks
    # added later for a turn planned ahead only lengthen it)
    block_ids: list[int]
    sample: bool               # True: this chunk ends at the request's last known token

    @property
    def num_logit_rows(self) -> int:
        """Rows of logits the runner returns for this chunk in RunnerOutput.logits: a scoring request
        wants every position of every chunk (all_positions) or the last position of its last chunk."""
        if not self.request.want_logits:
            return 0
        if self.request.all_positions:
            return len(self.token_ids)
        return 1 if self.sample else 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[str] = field(default_factory=list)   # request ids whose blocks were freed this turn
    finished: list[str] = field(default_factory=list)    # request ids that left since the last turn
    # A plan made by Scheduler.schedule_ahead: chunk i's one token is the i-th id the turn still
    # running samples (on the device, unknown to the host yet); its token_ids hold placeholders.
    fed_by: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)       # request id -> next token id
    logits: dict[str, object] = field(default_factory=dict)     # request id -> float32 [rows, vocab] (scoring)
