"""The agent's bounded expert memory: loads on demand, by prefetch or by fill; coalesces, pins,
evicts.

Invariant: bytes of resident experts + bytes reserved by loads in flight <= capacity, always (a
load reserves its bytes before it starts reading, evicting unpinned experts or waiting). Which
expert goes is the policy's choice (`cache_policy.py`), except that experts another agent holds
too (`elsewhere`, from the routing table) go before the pool's only copies, experts the current
plan needs (`protect`) go last, and a prefetch never evicts them. A fill (an expert no agent
holds, read into free memory while the disk is idle) never evicts a whole expert (it may take
unused slices' room), gives its reservation back to any load that needs the room before its read
starts, and yields the disk between chunks to any demand or prefetch read (it goes back in the
queue and starts over). The placement's experts (`place`, the
scheduler's choice of what this agent keeps) are never evicted; those not resident are read after
demand and prefetch reads, each taking the room of an unplaced expert nobody uses (the rest of
the memory stays a cache). The disk reads one expert at a time, most urgent first (`disk_queue.py`).
Runs on the agent's event loop; only reads happen in the disk thread.

Besides whole experts it holds slices (`SliceId`, an expert's share under expert tensor
parallelism), each taking its own bytes of the same budget, read and evicted like a whole expert
(a cache only: never placed, filled or prefetched). `resident`, `loading` and `pin_layer` name
whole experts; `resident_slices` names the slices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from concurrent.futures import Executor

from node_agent.buffer_entries import (DEMAND, FILL, PLACE, PREFETCH, BufferCounters, BufferTooSmall, Entry, FetchFn,
                                       Key, LayerPins, LoadFn, NotResident, ReadPreempted, choose_victim, evictable,
                                       slices_to_free, unstarted_fill)
from node_agent.cache_policy import EvictionPolicy, LRUPolicy
from node_agent.disk_queue import DiskQueue
from node_agent.model.moe import ExpertWeights
from protos.ids import ExpertId, SliceId

__all__ = ["BufferCounters", "BufferTooSmall", "ExpertBuffer", "FetchFn", "Key", "LayerPins", "NotResident", "ReadPreempted"]  # callers import these


class ExpertBuffer:
    def __init__(
        self,
        capacity_bytes: int,
        expert_nbytes: int,
        load: LoadFn,
        disk_executor: Executor,
        policy: EvictionPolicy[Key] | None = None,
        intermediate: int = 0,
    ) -> None:
        if capacity_bytes and capacity_bytes < expert_nbytes:
            raise BufferTooSmall(f"expert memory {capacity_bytes} bytes cannot hold one expert ({expert_nbytes} bytes)")
        self.capacity = capacity_bytes  # 0 = unlimited
        self.expert_nbytes = expert_nbytes
        self.intermediate = intermediate  # an expert's intermediate units (sizes its slices)
        self.policy: EvictionPolicy[Key] = policy or LRUPolicy()
        self._entries: dict[Key, Entry] = {}
        self._used = 0  # bytes of the entries
        self._resident: dict[int, dict[int, Entry]] = {}  # layer -> index -> entry, resident only
        self._space = asyncio.Condition()
        self._room_waiters = 0  # demand reads waiting for a pin to be released
        self.counters = BufferCounters()
        self._disk_queue = DiskQueue(load, disk_executor, self.counters, lambda k, e: self._entries.get(k) is e,
                                     self._install, self._read_failed)
        self.protected: frozenset[ExpertId] = frozenset()
        self.placed: frozenset[ExpertId] = frozenset()  # never evicted (`place`)
        self.elsewhere: frozenset[ExpertId] = frozenset()  # held by another agent too: evicted first
        self._placing: asyncio.Task[None] | None = None  # reads the placement's missing experts

    @property
    def bytes_used(self) -> int:
        """Resident plus reserved for loads in flight."""
        return self._used

    @property
    def slots_taken(self) -> int:
        """Experts resident or reserved for a read in flight (slices count by their bytes)."""
        return -(-self._used // self.expert_nbytes)

    def nbytes(self, key: Key) -> int:
        """What `key` takes of the budget."""
        if isinstance(key, ExpertId):
            return self.expert_nbytes
        if not self.intermediate:
            raise ValueError("this buffer holds whole experts only (it was not told their intermediate size)")
        start, stop = key.units(self.intermediate)
        return self.expert_nbytes * (stop - start) // self.intermediate

    def _add(self, key: Key, entry: Entry) -> None:
        self._entries[key] = entry
        self._used += entry.nbytes

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._used -= entry.nbytes
        if isinstance(key, ExpertId):
            self._resident.get(key.layer, {}).pop(key.index, None)

    def _evict(self, key: Key) -> None:
        self._drop(key)
        self.policy.on_remove(key)
        self.counters.evictions += 1

    def _fits(self, key: Key) -> bool:
        return not self.capacity or self.bytes_used + self.nbytes(key) <= self.capacity

    @property
    def waiting_for_room(self) -> int:
        """Demand reads waiting for a pinned expert's release (every byte is pinned or loading)."""
        return self._room_waiters

    def resident(self, layer: int) -> list[int]:
        return sorted(self._resident.get(layer, ()))

    def loading(self, layer: int) -> list[int]:
        return [e.index for e in self.all_loading() if e.layer == layer]

    def all_resident(self) -> list[ExpertId]:
        return sorted(e for e, v in self._entries.items() if isinstance(e, ExpertId) and v.weights is not None)

    def all_loading(self) -> list[ExpertId]:
        return sorted(e for e, v in self._entries.items() if isinstance(e, ExpertId) and v.weights is None)

    def resident_slices(self) -> list[SliceId]:
        return sorted(e for e, v in self._entries.items() if isinstance(e, SliceId) and v.weights is not None)

    def protect(self, experts: Iterable[ExpertId]) -> None:
        """Experts the current plan needs here: evicted last, never for a prefetch."""
        self.protected = frozenset(experts)

    @property
    def slots(self) -> int | None:
        """Experts the memory holds (None: unlimited)."""
        return self.capacity // self.expert_nbytes if self.capacity else None

    def place(self, experts: Iterable[ExpertId], fetch: Mapping[ExpertId, FetchFn] | None = None) -> None:
        """Keep these experts resident from now on, instead of the previous placement (whose
        experts stay as cache until their room is needed). At least one slot stays out of the
        placement, so that a demand read of an unplaced expert always finds room once its
        users let go. A missing expert in `fetch` is got that way (from a peer), else, or if that
        fails, read from disk. ValueError if the placement does not fit."""
        placed = frozenset(experts)
        if self.slots is not None and len(placed) > self.slots - 1:
            raise ValueError(f"a placement of {len(placed)} experts does not fit: the expert memory holds "
                             f"{self.slots}, and one slot stays a cache for demand reads")
        self.placed = placed
        if self._placing is not None:
            self._placing.cancel()  # begun over: experts whose read failed get another one
        self._placing = asyncio.get_running_loop().create_task(self._read_placement(dict(fetch or {})))

    async def _read_placement(self, fetch: dict[ExpertId, FetchFn]) -> None:
        """Read the placement's experts that are not in memory yet, one reservation at a time (so
        demand reads, queued ahead, keep the disk), until every one is resident or its read
        failed (a later `place` starts this over)."""
        failed: set[ExpertId] = set()  # reads that failed: not retried until the next placement
        while missing := sorted(e for e in self.placed if e not in self._entries and e not in failed):
            eid = missing[0]
            source = fetch.pop(eid, None)
            reserved = await self._reserve(eid, allow_protected=True, priority=PLACE, read=source is None)
            assert reserved is not None
            entry, queued = reserved
            if queued:
                self.counters.placements += 1
            if queued and source is not None:
                await self._disk_queue.fetch(eid, entry, source)
            try:
                await asyncio.shield(entry.loaded)
            except Exception:  # the read's own waiters hear why; the placement goes on without it
                failed.add(missing[0])

    @contextlib.asynccontextmanager
    async def pinned(self, eid: Key) -> AsyncIterator[ExpertWeights]:
        """Hold an expert in memory for the duration of the block, loading it if needed."""
        weights = await self.acquire(eid)
        try:
            yield weights
        finally:
            await self.release(eid)

    async def acquire(self, eid: Key) -> ExpertWeights:
        entry = self._entries.get(eid)
        queued = False  # whether this call queued the read (a miss)
        if entry is None:
            reserved = await self._reserve(eid, allow_protected=True)
            assert reserved is not None  # a demand read waits for room rather than give up
            entry, queued = reserved
        if queued:
            self.counters.misses += 1
        else:  # resident, or a read in flight (perhaps begun while this one waited for room)
            self.counters.hits += 1
            self.policy.on_access(eid)
            self._disk_queue.hurry(eid, entry, DEMAND)  # a queued prefetch or fill is now needed: it moves up
        entry.pins += 1
        try:
            return await asyncio.shield(entry.loaded)
        except BaseException:
            # This entry's pin, not whatever entry eid has now: a failed read drops its entry,
            # and another user may have begun a new read of eid before this one hears of it.
            await self._unpin(entry)
            raise

    def has(self, key: Key) -> bool:
        """Whether `key` is resident or being read."""
        return key in self._entries

    def room_for_slice(self, key: SliceId) -> bool:
        """Whether `key` is held or on its way, or fits without evicting a whole expert (free
        room, or a slice to evict)."""
        return key in self._entries or self._fits(key) or any(isinstance(k, SliceId) for k in evictable(self._entries))

    async def stream(self, key: SliceId, started: Entry | None = None) -> ExpertWeights:
        """Read a slice for one use without holding it: where the memory holds only whole
        experts, which the routing table sends homes to, a slice must not take one's room (each
        evicted one turned into a split for every agent, which evicted more). Its bytes exceed
        the budget while its caller computes with it: 1/N of an expert per slice in use.
        `started`: its read, queued earlier by `queue_stream` (it moves up to a demand read)."""
        entry = started or self.queue_stream(key)
        self._disk_queue.hurry(key, entry, DEMAND)
        return await entry.loaded

    def queue_stream(self, key: SliceId, priority: int = DEMAND) -> Entry:
        """Queue the read of a slice that will not be held (`stream`); cancelling the entry's
        `loaded` before its read starts drops it."""
        entry = Entry(self.nbytes(key), priority=priority, streamed=True)
        self.counters.streamed += 1
        self._disk_queue.push(priority, key, entry)
        return entry

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

    def pin_layer(self, layer: int) -> LayerPins:
        """Pin every expert of `layer` in memory now, without yielding to the event loop, and
        return their weights: a decode step's layer job picks those its tokens need on the compute
        thread, where it cannot wait for the event loop. `unpin_layer` gives them back."""
        entries = dict(self._resident.get(layer, {}))
        for entry in entries.values():
            entry.pins += 1
        return LayerPins(layer, {i: e.weights for i, e in entries.items() if e.weights is not None}, entries)

    async def unpin_layer(self, pins: LayerPins, used: Iterable[int]) -> None:
        """Release what `pin_layer` pinned; the experts in `used` count as hits."""
        freed = False
        for entry in pins.entries.values():
            entry.pins -= 1
            freed |= entry.pins == 0
        for index in used:
            self.counters.hits += 1
            self.policy.on_access(ExpertId(pins.layer, index))
        if freed:
            await self._room_freed()

    async def release(self, eid: Key) -> None:
        entry = self._entries.get(eid)
        if entry is not None:
            await self._unpin(entry)

    async def _unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0:
            await self._room_freed()

    async def _room_freed(self) -> None:
        """Wake the demand reads waiting for room (a pin released, an entry given up)."""
        if self._room_waiters:
            async with self._space:
                self._space.notify_all()

    async def prefetch(self, eid: Key, evict_whole: bool = True) -> bool:
        """Start reading an expert predicted to be needed, if that evicts nothing the current plan
        needs (and, without `evict_whole`, no whole expert: only slices); returns whether it is
        resident or on its way."""
        entry = self._entries.get(eid)
        if entry is None:
            reserved = await self._reserve(eid, allow_protected=False, evict_whole=evict_whole)
            if reserved is None:
                return False
            entry, queued = reserved
            if queued:
                self.counters.prefetches += 1
                return True
        if entry.priority == FILL:  # a fill is now predicted: it moves up, and (begun) no longer yields
            self._disk_queue.hurry(eid, entry, PREFETCH)
            entry.priority = PREFETCH
        return True

    def fill(self, eid: ExpertId, prefetch: bool = False) -> bool:
        """Queue a read of an expert into free memory at the lowest disk priority, or with
        `prefetch` at a prefetch's (after demand reads; a fill's room is given back to any load
        that needs it, a prefetch's is not); never evicts a whole expert, but takes the room of
        slices nobody uses (a slice is 1/N of a read; the whole expert the scheduler asks for is
        one no agent holds). Returns whether it is resident or on its way (False: no room)."""
        if eid in self._entries:
            return True
        if not self._fits(eid) and not self._room_from_slices(eid):
            return False
        priority = PREFETCH if prefetch else FILL
        entry = Entry(self.expert_nbytes, priority=priority)
        self._add(eid, entry)
        if prefetch:
            self.counters.prefetches += 1
        else:
            self.counters.fills += 1
        self._disk_queue.push(priority, eid, entry)
        return True

    def _room_from_slices(self, eid: ExpertId) -> bool:
        """Evict the unused slices that make room for eid (`slices_to_free`); whether they do."""
        victims = slices_to_free(self._entries, self.policy, self.placed, self.capacity - self.nbytes(eid))
        for key in victims or ():
            self._evict(key)
        return victims is not None

    async def give_up(self, eid: ExpertId) -> bool:
        """Evict a resident expert at the scheduler's word (it chose others for this memory):
        never a placed one, one in use, or one the current prefill plan needs. Returns whether
        it went."""
        entry = self._entries.get(eid)
        if entry is None or entry.pins or entry.weights is None or eid in self.placed or eid in self.protected:
            return False
        self._evict(eid)
        await self._room_freed()
        return True

    async def _install(self, eid: Key, entry: Entry, weights: ExpertWeights) -> None:
        """A read or fetch of eid is done: resident, its waiters woken."""
        entry.weights = weights
        if isinstance(eid, ExpertId):
            self._resident.setdefault(eid.layer, {})[eid.index] = entry
        self.counters.loads += 1
        self.policy.on_insert(eid, ahead=entry.pins == 0)  # nobody waits: a read-ahead
        entry.loaded.set_result(weights)
        async with self._space:
            self._space.notify_all()

    async def _reserve(self, eid: Key, allow_protected: bool, priority: int | None = None, read: bool = True,
                       evict_whole: bool = True) -> tuple[Entry, bool] | None:
        """Room for a read of eid, evicting or (a demand read) waiting for it; returns its entry
        and whether this call queued the read (False: another task's read of eid, resident or in
        flight, which began while this one waited), or None (a prefetch finds no room)."""
        async with self._space:
            while True:
                # Checked at every wake-up: once another task has reserved eid, this one joins
                # that read; it must not wait for room, nor evict eid when its read is done.
                if (existing := self._entries.get(eid)) is not None:
                    return existing, False
                if self._fits(eid):
                    break
                if (fill := unstarted_fill(self._entries)) is not None:
                    self._drop(fill)  # its reservation goes to this load; the reader skips its queue item
                    continue
                victim = choose_victim(self._entries, self.policy, self.placed, self.protected, allow_protected,
                                       evict_whole, self.elsewhere)
                if victim is None:
                    if not allow_protected:
                        return None  # a prefetch never waits or evicts what is needed
                    self._room_waiters += 1
                    try:
                        await self._space.wait()  # every byte is pinned or loading: wait for a release
                    finally:
                        self._room_waiters -= 1
                    continue
                self._evict(victim)
            entry = Entry(self.nbytes(eid),
                           priority=priority if priority is not None else DEMAND if allow_protected else PREFETCH)
            self._add(eid, entry)
        if read:  # else the caller fills it (`DiskQueue.fetch`)
            self._disk_queue.push(entry.priority, eid, entry)
        return entry, True

    async def _read_failed(self, eid: Key, entry: Entry, exc: Exception) -> None:
        """A read failed: its entry goes, its waiters get the error, room waiters look again."""
        if self._entries.get(eid) is entry:
            self._drop(eid)
        if not entry.loaded.done():  # (a streamed read given up while it ran)
            entry.loaded.set_exception(exc)
            entry.loaded.exception()  # retrieved: nobody may be waiting on a prefetch
        async with self._space:
            self._space.notify_all()
