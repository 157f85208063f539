"""The agent's one disk: reads queued experts and slices one at a time, most urgent first (the
expert buffer's reader, `expert_buffer.py`).

    ExpertBuffer --push(priority, key, entry)--> heap of (priority, order, key, entry)
        -> the disk thread reads the most urgent -> the buffer's `done` (installed; a streamed
           read goes to its waiter) or `failed` (its entry dropped, the error to its waiters)

A fill (the lowest priority) yields the disk between chunks to any demand, prefetch or placement
read queued meanwhile: its read stops (ReadPreempted) and goes back in the queue to start over.
A streamed read whose `loaded` is cancelled (a read-ahead given up) stops there too, for good.
A placed expert may come from a peer's memory instead (`fetch`), and from the disk if that fails.
An entry queued twice, already read, given up, or dropped from the buffer since (`current` says
no) is skipped. Runs on the agent's event loop; only the reads happen in the disk thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from node_agent.buffer_entries import FILL, BufferCounters, Entry, FetchFn, Key, LoadFn, ReadPreempted
from node_agent.model.moe import ExpertWeights
from protos.ids import ExpertId

log = logging.getLogger("potluck.agent")


class DiskQueue:
    def __init__(self, load: LoadFn, disk: Executor, counters: BufferCounters, current: Callable[[Key, Entry], bool],
                 done: Callable[[Key, Entry, ExpertWeights], Awaitable[None]],
                 failed: Callable[[Key, Entry, Exception], Awaitable[None]]) -> None:
        """current: whether the entry is still the buffer's for that key; done: a read to hold
        is in; failed: a read failed (its waiters are to hear why)."""
        self._load, self._disk = load, disk
        self._current, self._done, self._failed = current, done, failed
        self._heap: list[tuple[int, int, Key, Entry]] = []
        self._order = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self._urgent = threading.Event()  # a read other than a fill is queued (read by the disk thread)
        self.counters = counters  # the buffer's: fill_preemptions and fetches counted here

    def push(self, priority: int, key: Key, entry: Entry) -> None:
        """Queue a read of `key` into `entry` at `priority` (its entry keeps the most urgent it
        was asked at); a read queued again at a higher priority moves up."""
        entry.priority = min(entry.priority, priority)
        if priority < FILL:
            self._urgent.set()
        heapq.heappush(self._heap, (priority, next(self._order), key, entry))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def fetch(self, eid: ExpertId, entry: Entry, source: FetchFn) -> None:
        """Fill a reserved entry from a peer; on failure, queue its disk read instead."""
        entry.started = True  # the reader leaves it alone
        try:
            weights = await source(eid)
        except BaseException as exc:  # the peer dropped it, went away or sent the wrong shape: the disk has it
            entry.started = False  # (cancelled too: a new placement began, and others may wait on this entry)
            self.push(entry.priority, eid, entry)
            if not isinstance(exc, Exception):
                raise
            self.counters.fetch_failures += 1
            # A holder that made room for its own new experts meanwhile is the expected case in a
            # migration (NOT_FOUND); anything else an admin may want to see.
            level = logging.INFO if getattr(exc, "code", None) == "NOT_FOUND" else logging.WARNING
            log.log(level, "expert %s/%s: fetching it from a peer failed (%s); reading it from disk", eid.layer,
                    eid.index, exc)
            return
        self.counters.fetches += 1
        await self._done(eid, entry, weights)

    def hurry(self, key: Key, entry: Entry, priority: int) -> None:
        """A queued read is now wanted at `priority`: it moves up, unless its read has begun."""
        if not entry.started and entry.priority > priority:
            self.push(priority, key, entry)

    def _preempt_check(self, entry: Entry) -> Callable[[], None]:
        """Before each chunk of a read: a fill nobody waits for gives the disk to urgent reads,
        and a streamed read given up (its `loaded` cancelled) stops."""
        def check() -> None:
            if entry.priority == FILL and not entry.pins and self._urgent.is_set():
                raise ReadPreempted
            if entry.streamed and entry.loaded.cancelled():  # (a flag read from the disk thread)
                raise ReadPreempted
        return check

    async def _read_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while self._heap:
            _, _, key, entry = heapq.heappop(self._heap)
            if not self._heap or self._heap[0][0] == FILL:
                self._urgent.clear()  # nothing but fills left behind this read
            if entry.started or entry.loaded.done() or (not entry.streamed and not self._current(key, entry)):
                continue  # already read (queued twice), or dropped
            entry.started = True
            try:
                weights = await loop.run_in_executor(self._disk, self._load, key, self._preempt_check(entry))
            except ReadPreempted:
                if entry.loaded.done():  # a streamed read given up: gone
                    continue
                entry.started = False  # read again from the start once the urgent reads are done
                self.counters.fill_preemptions += 1
                heapq.heappush(self._heap, (entry.priority, next(self._order), key, entry))
                continue
            except Exception as exc:  # the waiters get the error; the reader goes on
                await self._failed(key, entry, exc)
                continue
            if not entry.streamed:
                await self._done(key, entry, weights)
            elif not entry.loaded.done():
                entry.loaded.set_result(weights)
