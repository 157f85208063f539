"""Emulated link latency sleeps no less than asked, and wakes sleepers in deadline order."""

from __future__ import annotations

import asyncio
import statistics
import time

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

    tasks = [asyncio.ensure_future(sleeper(s)) for s in (0.004, 0.001, 0.003, 0.002)]
    doomed = asyncio.ensure_future(sleeper(0.0015))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.gather(*tasks)
    assert doomed.cancelled()
    assert woke == [0.001, 0.002, 0.003, 0.004]
