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
    line = Throttle(1000.0)  # bytes/s
    assert line._reserve(1000, background=True) == pytest.approx(1.0, abs=0.01)  # a bulk transfer: 1 s
    assert line._reserve(100) == pytest.approx(0.1, abs=0.01)  # a small message does not queue behind it
    assert line._reserve(100) == pytest.approx(0.2, abs=0.01)  # but behind other foreground bytes
    assert line._reserve(100, background=True) == pytest.approx(1.3, abs=0.01)  # the bulk waited 0.2 s more


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
    # local agent holds) is not work the emulated device did, so it is not stretched.
    start = time.perf_counter()
    with ComputePacer(0.1).pace():
        time.sleep(0.05)
    assert time.perf_counter() - start < 0.05 / 0.1


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
    # The figures are wide so that a loaded host (spins slowed, threads held between jobs) keeps
    # the margins: each sleep asked is 0.4 s less the spin's wall time, 0.2 s less when chained.
    asked: list[float] = []

    def late_sleep(seconds: float) -> None:
        asked.append(seconds)
        time.sleep(seconds + 0.2)

    class Pacer(ComputePacer):
        CHAINED_S = 0.05  # wider than the agents' 2 ms, for the same reason

    pacer = Pacer(0.05, sleep=late_sleep)
    for _ in range(2):
        with pacer.pace():
            _spin(0.02)  # budget 0.4 s, most of it asleep
    time.sleep(3 * Pacer.CHAINED_S)  # idle
    with pacer.pace():
        _spin(0.02)
    first, chained, after_idle = asked
    assert chained < first - 0.1
    assert after_idle > chained + 0.1


def test_unpaced_compute_does_not_wait() -> None:
    start = time.perf_counter()
    with ComputePacer(0).pace():
        _spin(0.01)
    assert time.perf_counter() - start < 0.01 / 0.25
    with pytest.raises(ValueError, match="fraction of one core"):
        ComputePacer(1.5)
