"""The agent's bounded expert memory: loads on demand or by prefetch, coalesces, pins, evicts.

Invariant: bytes of resident experts + bytes reserved by loads in flight <= capacity, always (a
load reserves its bytes before it starts reading, evicting unpinned experts or waiting). Which
expert goes is the policy's choice (`cache_policy.py`), except that experts the current plan needs
(`protect`) go last, and a prefetch never evicts them. The disk reads one expert at a time, demand
loads before prefetches. Runs on the agent's event loop; only reads happen in the disk thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from node_agent.cache_policy import EvictionPolicy, LRUPolicy
from node_agent.model.moe import ExpertWeights
from protos.ids import ExpertId

DEMAND, PREFETCH = 0, 1  # disk queue priorities (lower first)


class BufferTooSmall(ValueError):
    """The byte budget cannot hold even one expert."""


@dataclass
class _Entry:
    pins: int = 0  # users computing with it (or waiting for its load)
    weights: ExpertWeights | None = None  # None while loading
    started: bool = False  # its read has begun
    loaded: asyncio.Future[ExpertWeights] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class BufferCounters:
    hits: int = 0  # acquisitions served from memory (resident or already loading)
    misses: int = 0  # acquisitions that started a load
    loads: int = 0  # loads completed
    evictions: int = 0  # experts dropped to make room
    prefetches: int = 0  # loads started by a prefetch


class ExpertBuffer:
    def __init__(
        self,
        capacity_bytes: int,
        expert_nbytes: int,
        load: Callable[[ExpertId], ExpertWeights],
        disk_executor: Executor,
        policy: EvictionPolicy[ExpertId] | None = None,
    ) -> None:
        if capacity_bytes and capacity_bytes < expert_nbytes:
            raise BufferTooSmall(f"expert memory {capacity_bytes} bytes cannot hold one expert ({expert_nbytes} bytes)")
        self.capacity = capacity_bytes  # 0 = unlimited
        self.expert_nbytes = expert_nbytes
        self._load = load
        self._disk = disk_executor
        self.policy: EvictionPolicy[ExpertId] = policy or LRUPolicy()
        self._entries: dict[ExpertId, _Entry] = {}
        self._space = asyncio.Condition()
        self._queue: asyncio.PriorityQueue[tuple[int, int, ExpertId, _Entry]] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self.protected: frozenset[ExpertId] = frozenset()
        self.counters = BufferCounters()

    @property
    def bytes_used(self) -> int:
        """Resident plus reserved for loads in flight."""
        return len(self._entries) * self.expert_nbytes

    def resident(self, layer: int) -> list[int]:
        return sorted(e.index for e, v in self._entries.items() if e.layer == layer and v.weights is not None)

    def loading(self, layer: int) -> list[int]:
        return sorted(e.index for e, v in self._entries.items() if e.layer == layer and v.weights is None)

    def all_resident(self) -> list[ExpertId]:
        return sorted(e for e, v in self._entries.items() if v.weights is not None)

    def protect(self, experts: Iterable[ExpertId]) -> None:
        """Experts the current plan needs here: evicted last, never for a prefetch."""
        self.protected = frozenset(experts)

    @contextlib.asynccontextmanager
    async def pinned(self, eid: ExpertId) -> AsyncIterator[ExpertWeights]:
        """Hold an expert in memory for the duration of the block, loading it if needed."""
        weights = await self.acquire(eid)
        try:
            yield weights
        finally:
            await self.release(eid)

    async def acquire(self, eid: ExpertId) -> ExpertWeights:
        entry = self._entries.get(eid)
        if entry is not None:
            self.counters.hits += 1
            self.policy.on_access(eid)
            if not entry.started:
                self._enqueue(DEMAND, eid, entry)  # a queued prefetch is now needed: jump the queue
        else:
            self.counters.misses += 1
            entry = await self._reserve(eid, allow_protected=True)
            assert entry is not None
        entry.pins += 1
        try:
            return await asyncio.shield(entry.loaded)
        except BaseException:
            await self.release(eid)
            raise

    def acquire_resident(self, eid: ExpertId) -> ExpertWeights:
        """Pin an expert that is in memory now, without yielding to the event loop (so nothing
        can evict it first); KeyError if it is not resident."""
        entry = self._entries.get(eid)
        if entry is None or entry.weights is None:
            raise KeyError(f"expert {eid} is not resident")
        self.counters.hits += 1
        self.policy.on_access(eid)
        entry.pins += 1
        return entry.weights

    async def release(self, eid: ExpertId) -> None:
        entry = self._entries.get(eid)
        if entry is None:
            return
        entry.pins -= 1
        if entry.pins == 0:
            async with self._space:
                self._space.notify_all()

    async def prefetch(self, eid: ExpertId) -> bool:
        """Start reading an expert predicted to be needed, if that evicts nothing the current plan
        needs; returns whether it is resident or on its way."""
        if eid in self._entries:
            return True
        entry = await self._reserve(eid, allow_protected=False)
        if entry is not None:
            self.counters.prefetches += 1
        return entry is not None

    def _victim(self, allow_protected: bool) -> ExpertId | None:
        free = {k for k, v in self._entries.items() if v.pins == 0 and v.weights is not None}
        unprotected = free - self.protected
        victim = next(iter(self.policy.victims(unprotected)), None)
        if victim is None and allow_protected:
            victim = next(iter(self.policy.victims(free)), None)
        return victim

    async def _reserve(self, eid: ExpertId, allow_protected: bool) -> _Entry | None:
        async with self._space:
            while self.capacity and self.bytes_used + self.expert_nbytes > self.capacity:
                victim = self._victim(allow_protected)
                if victim is None:
                    if not allow_protected:
                        return None  # a prefetch never waits or evicts what is needed
                    await self._space.wait()  # every byte is pinned or loading: wait for a release
                    continue
                del self._entries[victim]
                self.policy.on_remove(victim)
                self.counters.evictions += 1
            existing = self._entries.get(eid)
            if existing is not None:  # another task started the same load while we waited
                return existing
            entry = _Entry()
            self._entries[eid] = entry
        self._enqueue(DEMAND if allow_protected else PREFETCH, eid, entry)
        return entry

    def _enqueue(self, priority: int, eid: ExpertId, entry: _Entry) -> None:
        self._queue.put_nowait((priority, next(self._seq), eid, entry))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        """The one disk: read queued experts one at a time, most urgent first."""
        loop = asyncio.get_running_loop()
        while not self._queue.empty():
            _, _, eid, entry = self._queue.get_nowait()
            if entry.started or self._entries.get(eid) is not entry:
                continue  # already read (queued twice), or dropped
            entry.started = True
            try:
                weights = await loop.run_in_executor(self._disk, self._load, eid)
            except Exception as exc:  # the waiters get the error; the reader goes on
                self._entries.pop(eid, None)
                entry.loaded.set_exception(exc)
                entry.loaded.exception()  # retrieved: nobody may be waiting on a prefetch
            else:
                entry.weights = weights
                self.counters.loads += 1
                self.policy.on_insert(eid, ahead=entry.pins == 0)  # nobody waits: a read-ahead
                entry.loaded.set_result(weights)
            async with self._space:
                self._space.notify_all()
