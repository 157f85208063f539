"""The agent's bounded expert memory: loads on demand, coalesces concurrent loads, pins, evicts.

Invariant: bytes of resident experts + bytes reserved by loads in flight <= capacity, always (a
load reserves its bytes before it starts reading, waiting for unpinned experts to be evicted if
needed). Which expert goes is the policy's choice (`cache_policy.py`); this class moves bytes.
Runs on the agent's event loop; only the reads happen in the disk thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from node_agent.cache_policy import EvictionPolicy, LRUPolicy
from node_agent.model.moe import ExpertWeights
from scheduler.types import ExpertId


class BufferTooSmall(ValueError):
    """The byte budget cannot hold even one expert."""


@dataclass
class _Entry:
    pins: int = 0  # users computing with it (or waiting for its load)
    weights: ExpertWeights | None = None  # None while loading
    loaded: asyncio.Future[ExpertWeights] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class BufferCounters:
    hits: int = 0  # acquisitions served from memory (resident or already loading)
    misses: int = 0  # acquisitions that started a load
    loads: int = 0  # loads completed
    evictions: int = 0  # experts dropped to make room


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
        else:
            self.counters.misses += 1
            entry = await self._start_load(eid)
        entry.pins += 1
        try:
            return await asyncio.shield(entry.loaded)
        except BaseException:
            await self.release(eid)
            raise

    async def release(self, eid: ExpertId) -> None:
        entry = self._entries.get(eid)
        if entry is None:
            return
        entry.pins -= 1
        if entry.pins == 0:
            async with self._space:
                self._space.notify_all()

    async def _start_load(self, eid: ExpertId) -> _Entry:
        async with self._space:
            while self.capacity and self.bytes_used + self.expert_nbytes > self.capacity:
                victim = next(iter(self.policy.victims({k for k, v in self._entries.items() if v.pins == 0 and v.weights is not None})), None)
                if victim is None:
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
        asyncio.get_running_loop().run_in_executor(self._disk, self._load, eid).add_done_callback(
            lambda fut: asyncio.ensure_future(self._finish_load(eid, entry, fut))
        )
        return entry

    async def _finish_load(self, eid: ExpertId, entry: _Entry, fut: asyncio.Future[ExpertWeights]) -> None:
        exc = fut.exception()
        if exc is not None:
            self._entries.pop(eid, None)
            entry.loaded.set_exception(exc)
        else:
            entry.weights = fut.result()
            self.counters.loads += 1
            self.policy.on_insert(eid)
            entry.loaded.set_result(entry.weights)
        async with self._space:
            self._space.notify_all()
