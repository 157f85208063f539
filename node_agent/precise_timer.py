"""Sleeps that end on time, for the link emulation's latency.

An asyncio timer fires late: the selector waits in whole milliseconds (epoll rounds a 0.7 ms
timeout up to 1 ms) and the kernel adds its timer slack. On this project's host, with four agents
running, `asyncio.sleep(0.001)` took 1.13-1.17 ms, so an emulated 1 ms link was 15% slower than
asked, on both ends of every decode round trip (six a token on the LAN bench). On Linux a
`timerfd` armed at the earliest deadline sits in the event loop's own selector and wakes it on
time (no thread, no extra wake-up); elsewhere `asyncio.sleep` stands in.

    await sleep_precisely(0.001)   # resumes no earlier than 1 ms from now, and close to it
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import os
import sys
import time
import weakref

_CLOCK_MONOTONIC = 1  # time.monotonic()'s clock on Linux
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = 0o2000000
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """One loop's timerfd and the deadlines waiting on it (earliest first)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, libc: ctypes.CDLL) -> None:
        self.libc = libc  # no reference to the loop: the loop's reader holds this object
        self.fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.waiting: list[tuple[float, int, asyncio.Future[None]]] = []
        self.order = itertools.count()  # ties keep their order; futures never compare
        self.armed: float | None = None
        loop.add_reader(self.fd, self._fire)
        weakref.finalize(loop, os.close, self.fd)

    def wait_until(self, deadline: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (deadline, next(self.order), fut))
        if self.armed is None or deadline < self.armed:
            self._arm(deadline)
        return fut

    def _arm(self, deadline: float) -> None:
        sec, frac = divmod(deadline, 1.0)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(sec), max(1, int(frac * 1e9))))
        if self.libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")
        self.armed = deadline

    def _fire(self) -> None:
        try:
            os.read(self.fd, 8)  # the expiry count; clears readiness
        except BlockingIOError:
            pass
        self.armed = None
        now = time.monotonic()
        while self.waiting and self.waiting[0][0] <= now:
            _, _, fut = heapq.heappop(self.waiting)
            if not fut.done():
                fut.set_result(None)
        if self.waiting:
            self._arm(self.waiting[0][0])


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create  # noqa: B018 (present since Linux 2.6.25, glibc 2.8)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()
_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TimerFd] = weakref.WeakKeyDictionary()


async def sleep_precisely(seconds: float) -> None:
    """Resume no earlier than `seconds` from now (and, on Linux, within tens of microseconds)."""
    deadline = time.monotonic() + seconds
    loop = asyncio.get_running_loop()
    timer = _TIMERS.get(loop)
    if timer is None and _LIBC is not None:
        try:
            timer = _TIMERS[loop] = _TimerFd(loop, _LIBC)
        except (OSError, NotImplementedError):  # no timerfd, or a loop without add_reader
            timer = None
    if timer is None:
        await asyncio.sleep(seconds)
        return
    await timer.wait_until(deadline)
