"""The stream interval chosen by load: raised one step per saturated sample of cortex's event
loop up to the maximum, lowered one step per sample with room down to the base, held in between."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from cortex.metrics import CortexMetrics
from cortex.stream_pacing import StreamPacer


def test_a_saturated_loop_raises_the_interval_a_step_a_sample_up_to_the_maximum():
    pacer = StreamPacer(1, 3)
    assert [pacer.observe(0.97) for _ in range(4)] == [2, 3, 3, 3]


def test_room_lowers_it_a_step_a_sample_down_to_the_base_and_the_band_between_holds_it():
    pacer = StreamPacer(2, 5)
    for _ in range(3):
        pacer.observe(1.0)
    assert pacer.interval == 5
    assert [pacer.observe(0.65) for _ in range(3)] == [5, 5, 5]          # between low and high: kept
    assert [pacer.observe(0.2) for _ in range(5)] == [4, 3, 2, 2, 2]    # never below the base


def test_a_fixed_interval_never_moves():
    pacer = StreamPacer(2, 2)
    assert not pacer.adaptive
    assert {pacer.observe(busy) for busy in (1.0, 0.0, 1.0)} == {2}


@pytest.mark.parametrize("base, maximum, low, high", [(0, 1, 0.6, 0.9), (3, 2, 0.6, 0.9), (1, 4, 0.9, 0.6)])
def test_impossible_bounds_are_refused(base, maximum, low, high):
    with pytest.raises(ValueError):
        StreamPacer(base, maximum, high=high, low=low)


def test_run_samples_the_loop_threads_cpu_share():
    """A fake loop thread busy for all of each period, then idle: the interval climbs, then falls."""
    pacer = StreamPacer(1, 4, period=0.0)
    clock = iter(i * 0.1 for i in range(100))
    spent = iter([0.0, 0.1, 0.2, 0.3] + [0.3] * 96)   # busy for three periods, then idle
    seen = []

    async def main():
        task = asyncio.create_task(pacer.run(clock=lambda: next(clock), cpu=lambda: next(spent)))
        for _ in range(8):
            await asyncio.sleep(0)
            seen.append(pacer.interval)
        task.cancel()

    asyncio.run(main())
    # one sample per pass of the loop: three saturated periods (1 -> 4), then idle ones (4 -> 1)
    assert seen == [1, 2, 3, 4, 3, 2, 1, 1]


def test_the_interval_in_force_is_a_metric():
    metrics = CortexMetrics()
    pacer = StreamPacer(1, 4)
    metrics.watch_pacer(pacer)
    pacer.observe(1.0)
    text = generate_latest(metrics.registry).decode()
    assert "cortex_stream_interval 2.0" in text
