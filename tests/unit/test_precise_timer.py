"""Emulated link latency sleeps no less than asked, and wakes sleepers in deadline order."""

from __future__ import annotations

import asyncio
import statistics
import time

from node_agent import precise_timer
from node_agent.precise_timer import sleep_precisely


async def test_a_sleep_is_never_shorter_than_asked() -> None:
    late = []
    for seconds in (0.0, 0.0003, 0.001, 0.0025):
        for _ in range(20):
            began = time.monotonic()
            await sleep_precisely(seconds)
            waited = time.monotonic() - began
            assert waited >= seconds
            late.append(waited - seconds)
    print(f"median overshoot {1e6 * statistics.median(late):.0f} us")  # asyncio.sleep: ~150 us here


async def test_sleepers_wake_in_deadline_order_and_a_cancelled_one_leaves_the_rest() -> None:
    woke: list[float] = []

    async def sleeper(seconds: float) -> None:
        await sleep_precisely(seconds)
        woke.append(seconds)

    started = (0.004, 0.001, 0.003, 0.002, 0.0015)  # the order the sleepers start in
    tasks = [asyncio.ensure_future(sleeper(s)) for s in started[:-1]]
    doomed = asyncio.ensure_future(sleeper(started[-1]))
    await asyncio.sleep(0)  # each sleeper has started: its deadline is set, now + its seconds
    # A busy host may hold the loop between one sleeper's start and the next's for longer than
    # the 1 ms between the seconds asked, so the deadlines set are read back (the timer's line
    # holds them in the order the sleepers started), not assumed from the seconds asked.
    timer = precise_timer._TIMERS.get(asyncio.get_running_loop())
    waiting = sorted(timer.waiting, key=lambda w: w[1]) if timer is not None else [(s, 0, None) for s in started]
    deadline = {s: d for s, (d, _, _) in zip(started, waiting, strict=True)}
    doomed.cancel()
    await asyncio.gather(*tasks)
    assert doomed.cancelled()
    assert woke == sorted(started[:-1], key=deadline.__getitem__)
    assert sorted(woke) == [0.001, 0.002, 0.003, 0.004]  # and the cancelled one did not wake
