"""Throttles: moving B bytes at rate R takes at least B/R, through the real store and link; the
compute pacer stretches CPU work by its share."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.peers import Link
from node_agent.throttle import ComputePacer, Throttle
from protos.convert import tensor_to_proto
from scheduler.types import ExpertId


def test_expert_store_reads_no_faster_than_the_disk_rate(qwen_tiny: Path) -> None:
    cfg = MoeConfig.load(qwen_tiny)
    probe = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
    rate = probe.expert_nbytes * 4 / 0.4  # four experts in 0.4 s
    store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(rate))
    start = time.monotonic()
    for e in range(4):
        store.load(ExpertId(0, e))
    elapsed = time.monotonic() - start
    assert store.bytes_read == 4 * probe.expert_nbytes
    assert elapsed >= store.bytes_read / rate


def test_concurrent_readers_share_one_rate_and_idle_time_is_not_banked() -> None:
    throttle = Throttle(1_000_000)  # 1 MB/s
    time.sleep(0.2)  # idle: must not become credit
    start = time.monotonic()
    throttle.pace(100_000)
    throttle.pace(100_000)
    assert time.monotonic() - start >= 0.2


async def test_link_sends_no_faster_than_its_rate() -> None:
    link = Link(2_000_000)  # 2 MB/s
    t = tensor_to_proto(torch.zeros(100_000))  # 400 kB
    start = time.monotonic()
    await asyncio.gather(link.send(t), link.send(t))
    assert time.monotonic() - start >= 2 * 400_000 / 2_000_000
    assert link.bytes_sent == 800_000


def test_background_bytes_yield_to_foreground_ones() -> None:
    # The line's clock stands still, so each wait is the line's own schedule, not that less the
    # time a busy host took between two reservations (which a wall clock would subtract).
    line = Throttle(1000.0, clock=lambda: 100.0)  # bytes/s
    assert line._reserve(1000, background=True) == pytest.approx(1.0)  # a bulk transfer: 1 s
    assert line._reserve(100) == pytest.approx(0.1)  # a small message does not queue behind it
    assert line._reserve(100) == pytest.approx(0.2)  # but behind other foreground bytes
    assert line._reserve(100, background=True) == pytest.approx(1.3)  # the bulk waited 0.2 s more


def test_idle_time_is_not_credit_and_received_bytes_count_from_their_start() -> None:
    now = [100.0]
    line = Throttle(1000.0, clock=lambda: now[0])  # bytes/s
    assert line._reserve(100) == pytest.approx(0.1)
    now[0] += 10.0  # the line idles for 10 s
    assert line._reserve(100) == pytest.approx(0.1)  # not 0: the idle time bought nothing
    assert line._reserve(100) == pytest.approx(0.2)
    now[0] += 1.0
    assert line._reserve(100, ago_s=0.1) == pytest.approx(0.0)  # began arriving 0.1 s ago: through now
    assert line._reserve(100, ago_s=0.1) == pytest.approx(0.1)  # behind it


def test_unlimited_rate_books_no_wait() -> None:
    assert Throttle(0)._reserve(10**12) == 0.0
    assert Throttle(10.0)._reserve(20) > 1.0


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_compute_pacer_stretches_cpu_time_by_its_share() -> None:
    pacer = ComputePacer(0.25)
    start = time.perf_counter()
    with pacer.pace():
        _spin(0.02)
    assert time.perf_counter() - start >= 0.02 / 0.25


def test_compute_pacer_counts_cpu_not_waiting() -> None:
    # Time the thread spends off the CPU (here asleep; under pacing, waiting for a core another
    # local agent holds) is not work the emulated device did, so it is not stretched: the pacer
    # asks for no sleep (counting the 50 ms as work would ask for 0.45 s more). Checked on the
    # sleeps it asks for, not on wall time, which a busy host stretches.
    asked: list[float] = []
    pacer = ComputePacer(0.1, sleep=asked.append)
    with pacer.pace():
        time.sleep(0.05)
    assert asked == []
    assert pacer.paced_cpu_s < 0.01


def test_compute_pacer_counts_time_past_its_budget_as_overrun() -> None:
    # A thread kept off the CPU longer than its share's budget (here asleep: no CPU time, so no
    # budget) took longer than the emulated device would have; the excess is the overrun.
    pacer = ComputePacer(0.5)
    with pacer.pace():
        time.sleep(0.05)
    assert pacer.overrun_s >= 0.04
    unpaced = ComputePacer(0)
    with unpaced.pace():
        time.sleep(0.01)
    assert unpaced.overrun_s == 0.0


def test_compute_pacer_gives_a_late_sleep_back_to_the_work_chained_after_it() -> None:
    # A host that wakes sleepers 0.2 s late: the work chained right after a late sleep sleeps
    # that much less (the emulated device's timeline), work after an idle gap is owed nothing.
    # Each sleep asked is the budget (0.01 s of CPU at share 0.025: 0.4 s) less the work's wall
    # time, less what is owed. The test times each work itself and adds that back, so a loaded
    # host, which stretches the spins unevenly, leaves the figures alone: budget less owed.
    asked: list[float] = []
    worked: list[float] = []

    def late_sleep(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(seconds + 0.2)

    class Pacer(ComputePacer):
        CHAINED_S = 0.1  # wider than the agents' 2 ms: a busy host may hold the thread between jobs

    pacer = Pacer(0.025, sleep=late_sleep)

    def work() -> None:
        with pacer.pace():
            start = time.perf_counter()
            _spin(0.01)
            worked.append(time.perf_counter() - start)

    work()
    work()
    time.sleep(3 * Pacer.CHAINED_S)  # idle
    work()
    assert len(asked) == 3, asked  # each work asked for a sleep
    first, chained, after_idle = (a + w for a, w in zip(asked, worked))
    assert first == pytest.approx(0.4, abs=0.1)  # the whole budget
    assert chained < first - 0.1  # less the 0.2 s the sleep before it overran
    assert after_idle > chained + 0.1


def test_unpaced_compute_does_not_wait() -> None:
    asked: list[float] = []
    unpaced = ComputePacer(0, sleep=asked.append)
    with unpaced.pace():
        _spin(0.01)
    assert asked == []  # the sleeps it would ask for, not wall time: a busy host stretches the spin
    assert (unpaced.paced_cpu_s, unpaced.overrun_s) == (0.0, 0.0)  # nothing was paced
    with pytest.raises(ValueError, match="fraction of one core"):
        ComputePacer(1.5)
