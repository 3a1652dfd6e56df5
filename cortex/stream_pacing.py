"""The stream interval chosen by load: how many tokens each client message of a generation carries.

Every client message costs cortex's event loop gRPC's per-message work, which is most of its CPU
under load. Once the loop is saturated, sending each token as its own message does not get tokens
out sooner: a neuron's turn messages wait in the transport behind the writes of the turn before,
and each generation still sees one token at a time, so the loop stays saturated at ~1.2 tokens a
message. On one H200, 256 streams of a 1B model kept cortex's main thread at 0.93-1.00 of a core
while the neuron had room to spare (bench/NOTES.md, session 19).

`StreamPacer` samples the loop thread's CPU share every `period` seconds and raises the interval
by one while that share is at or above `high`, and lowers it by one once it is below `low`, between
`base` (--stream-interval) and `maximum` (--max-stream-interval). A light load stays at the base,
so one stream's tokens still go out as they come; an overloaded cortex sends fewer, larger messages
instead of falling behind. The gap between `high` and `low` keeps the interval from flapping: a
raised interval lowers the share it was raised for.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)


@dataclass
class StreamPacer:
    base: int = 1                 # tokens a message carries after a generation's first, unloaded
    maximum: int = 1              # the most it carries under load (== base: a fixed interval)
    high: float = 0.8             # the loop thread's CPU share that raises the interval
    low: float = 0.5              # the share below which it is lowered again
    period: float = 0.1           # seconds between samples
    interval: int = field(init=False)

    def __post_init__(self):
        if self.base < 1 or self.maximum < self.base:
            raise ValueError(f"stream interval: need 1 <= base ({self.base}) <= maximum ({self.maximum})")
        if not 0.0 < self.low < self.high:
            raise ValueError(f"stream interval: need 0 < low ({self.low}) < high ({self.high})")
        self.interval = self.base

    @property
    def adaptive(self) -> bool:
        return self.maximum > self.base

    def observe(self, busy: float) -> int:
        """One sample of the loop thread's CPU share (0..1 of a core); returns the interval now."""
        before = self.interval
        if busy >= self.high and self.interval < self.maximum:
            self.interval += 1
        elif busy < self.low and self.interval > self.base:
            self.interval -= 1
        if self.interval != before:
            log.debug("stream interval changed", interval=self.interval, loop_busy=round(busy, 3))
        return self.interval

    async def run(self, clock=time.perf_counter, cpu=time.thread_time) -> None:
        """Sample every `period` until cancelled. Runs on the event loop's thread, so `cpu`
        (thread_time) is the loop's own CPU, not that of gRPC's threads or anything else."""
        wall, used = clock(), cpu()
        while True:
            await asyncio.sleep(self.period)
            now, spent = clock(), cpu()
            self.observe((spent - used) / max(now - wall, 1e-9))
            wall, used = now, spent
