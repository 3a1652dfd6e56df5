"""Device health: whether each device worker is alive and making progress, and what the neuron does
when one is not.

A worker whose thread died (a bug) fails every request sent to it, so the neuron must not look
healthy: health goes NOT_SERVING, Describe reports the device's error (cortex then marks its models
UNAVAILABLE), and after a grace period the neuron exits non-zero so its supervisor restarts it.
A worker that holds work (requests, or a job in progress) but finishes no turn for the watchdog's
time is reported the same way, without the exit: it may still recover.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)

CHECK_SECONDS = 0.5


def device_error(worker, stall_seconds: float, now: float | None = None) -> str:
    """Empty when the device is fine; otherwise why it is not (Describe's Device.error)."""
    if not worker.alive and worker.failure:
        return worker.failure
    if not worker.alive:
        return "the device worker is not running"
    now = time.monotonic() if now is None else now
    idle_for = now - worker.progress_at
    if stall_seconds > 0 and worker.holds_work() and idle_for > stall_seconds:
        return (f"stalled: the device holds work but finished no turn for {idle_for:.0f}s "
                f"(watchdog {stall_seconds:g}s)")
    return ""


class DeviceWatch:
    """Polls the workers; turns health NOT_SERVING while any device has an error and back once none
    has; calls `exit_now` once a worker has been dead for `exit_after` seconds."""

    def __init__(self, workers, set_serving: Callable[[bool], Awaitable[None]], draining: Callable[[], bool],
                 exit_now: Callable[[], None], stall_seconds: float, exit_after: float):
        self.workers = workers
        self.set_serving = set_serving
        self.draining = draining
        self.exit_now = exit_now
        self.stall_seconds = stall_seconds
        self.exit_after = exit_after
        self.serving = True
        self.dead_since: float | None = None
        self.errors: dict[str, str] = {}

    async def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        errors = {w.spec.id: e for w in self.workers if (e := device_error(w, self.stall_seconds, now))}
        for device in set(errors) - set(self.errors):
            log.error("device unhealthy", device=device, error=errors[device])
        for device in set(self.errors) - set(errors):
            log.info("device recovered", device=device)
        self.errors = errors
        serving = not errors
        if serving != self.serving and not self.draining():
            await self.set_serving(serving)
            self.serving = serving
        dead = any(not w.alive for w in self.workers)
        if not dead:
            self.dead_since = None
            return
        self.dead_since = self.dead_since or now
        if now - self.dead_since >= self.exit_after:
            log.critical("a device worker is dead: exiting non-zero so the supervisor restarts the neuron",
                         after_seconds=self.exit_after, errors=errors)
            self.exit_now()

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watch must outlive anything it observes
                log.exception("device watch failed")
            await asyncio.sleep(CHECK_SECONDS)
