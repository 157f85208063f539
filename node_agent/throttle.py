"""Pacing that emulates a device's disk or link bandwidth (bytes) and its compute speed.

A throttle is a single queue of bytes at `rate` bytes/s: each reservation starts when the previous
one ends (or now, if the line is idle) and no idle time is banked as credit, so bursts after a
pause are not faster than the rate, and concurrent users share the one rate. Rate 0 = unlimited.

Background bytes (a link's bulk transfers, such as a prompt's K/V moving to its home) yield to
the others: a foreground reservation queues only behind foreground bytes, and pushes the
background backlog back by its own length, as a link scheduler that serves latency-sensitive
flows first would. Background bytes already being waited out are not delayed again.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from node_agent.precise_timer import sleep_precisely


LOOP_TIMER_S = 0.001  # asyncio's epoll selector sleeps in whole milliseconds (it rounds timeouts up)


class Throttle:
    def __init__(self, rate_bytes_per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_bytes_per_s < 0:
            raise ValueError(f"rate must be >= 0 bytes/s, got {rate_bytes_per_s}")
        self.rate = rate_bytes_per_s
        self._clock = clock  # seconds; reservations are booked against it (a test may stop it)
        self._lock = threading.Lock()
        self._free_at = 0.0  # clock time at which the line is idle again (every byte through)
        self._foreground_free_at = 0.0  # ... at which the foreground bytes are through

    def _reserve(self, nbytes: int, ago_s: float = 0.0, background: bool = False) -> float:
        """Book nbytes on the line, starting no earlier than `ago_s` before now (and, in the
        background, after every byte booked so far); return how long the caller must wait until
        they are through."""
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            length = nbytes / self.rate
            if background:
                self._free_at = max(now - ago_s, self._free_at) + length
                return self._free_at - now
            end = max(now - ago_s, self._foreground_free_at) + length
            self._foreground_free_at = end
            self._free_at = max(self._free_at + length, end)  # the background backlog waits for it
            return end - now

    def pace(self, nbytes: int) -> None:
        """Block the calling thread (a disk reader) until nbytes have passed at the rate."""
        wait = self._reserve(nbytes)
        if wait > 0:
            time.sleep(wait)

    async def pace_async(self, nbytes: int, ago_s: float = 0.0, background: bool = False) -> None:
        """Wait on the event loop (a sender) until nbytes have passed at the rate; with ago_s,
        bytes that began arriving that long ago (a receiver) may have passed in the meantime.

        A wait shorter than LOOP_TIMER_S is not slept: with asyncio's own timer (epoll wakes in
        whole milliseconds) a 16 us wait (a decode token's 2 KB at 1 Gbit/s) took a millisecond,
        and a remote expert call, paced four times, took 4 ms more than its link; even a precise
        sleep costs a wake-up per message. The bytes stay booked on the line, so a burst of small
        messages still queues behind them and waits once the backlog exceeds LOOP_TIMER_S: the
        rate holds over any burst."""
        wait = self._reserve(nbytes, ago_s, background)
        if wait >= LOOP_TIMER_S:
            await sleep_precisely(wait)


class ComputePacer:
    """Emulates a processor slower than this machine's: work that takes c CPU-seconds of the
    calling thread takes c / share wall seconds (share 0 = no pacing).

    Pacing counts the thread's CPU time, not wall time, so several emulated devices sharing
    this machine's cores are not slowed twice by their contention; it needs torch on one thread,
    which `AgentSettings` enforces. Used by benchmarks to give each local agent its own compute,
    so that compute pools across agents the way it does across devices.

    When the host cannot give the thread its share (more emulated devices than cores can carry),
    work takes longer than the emulated device would; `overrun_s` adds that excess up, so a
    benchmark can show whether its emulation held.

    A sleep ends late when the host's cores are busy (a quarter to half a millisecond per sleep
    with four local agents on two cores, against a tenth with one), which is this machine's lag,
    not the device's. Work that starts right after the previous work ended (`CHAINED_S`: the
    next step of the same computation) is owed that lag and sleeps that much less, so a chain
    of work keeps the emulated device's timeline. Work after an idle gap is owed nothing: the
    lag did not delay it, and idle time is never credit.
    """

    CHAINED_S = 0.002

    def __init__(self, share: float, sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"compute share must be in [0, 1] (a fraction of one core), got {share}")
        self.share = share
        self.overrun_s = 0.0  # wall seconds beyond c / share, summed over paced work
        self.paced_cpu_s = 0.0  # CPU seconds of the work it paced (the rest of the agent's CPU is not paced)
        self._sleep = sleep
        self._late = 0.0  # how far the last paced work ended past the emulated device's end
        self._ended = -math.inf  # perf_counter() when it ended

    @contextlib.contextmanager
    def pace(self) -> Iterator[None]:
        if not self.share:
            yield
            return
        cpu, wall = time.thread_time(), time.perf_counter()
        owed = self._late if wall - self._ended <= self.CHAINED_S else 0.0
        yield
        used = time.thread_time() - cpu
        self.paced_cpu_s += used
        budget = used / self.share
        elapsed = time.perf_counter() - wall
        if elapsed > budget:
            self.overrun_s += elapsed - budget
            self._late = 0.0  # an overrun is counted, not made up
        elif (wait := budget - elapsed - owed) > 0:
            start = time.perf_counter()
            self._sleep(wait)
            self._late = time.perf_counter() - start - wait
        else:
            self._late = -wait  # owed more than this work could give back: the rest carries on
        self._ended = time.perf_counter()
