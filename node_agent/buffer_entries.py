"""What the expert buffer (`expert_buffer.py`) holds and says: its keys, entries, counters,
disk priorities and errors; and which of its entries may go to make room (pure choices over
the entries, which the buffer then acts on)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field

from node_agent.cache_policy import EvictionPolicy
from node_agent.model.moe import ExpertWeights
from protos.ids import ExpertId, SliceId

DEMAND, PREFETCH, PLACE, FILL = 0, 1, 2, 3  # disk queue priorities (lower first)


class BufferTooSmall(ValueError):
    """The byte budget cannot hold even one expert."""


class NotResident(LookupError):
    """A peer asked for an expert this agent does not hold in memory."""


class ReadPreempted(Exception):
    """A fill's read stopped between chunks because a more urgent read is waiting."""


Key = ExpertId | SliceId  # what the buffer holds: a whole expert, or a slice of one

# Reads an expert or a slice; calls the given check before every chunk (the check raises
# ReadPreempted to stop a read that must give the disk up). Runs in the disk thread.
LoadFn = Callable[[Key, Callable[[], None]], ExpertWeights]
# Gets a placed expert from a peer's memory instead (`place`); on the event loop.
FetchFn = Callable[[ExpertId], Awaitable[ExpertWeights]]


@dataclass
class Entry:
    nbytes: int  # what it takes of the budget
    pins: int = 0  # users computing with it (or waiting for its load)
    weights: ExpertWeights | None = None  # None while loading
    started: bool = False  # its read has begun
    priority: int = DEMAND  # the most urgent disk priority it was asked at
    streamed: bool = False  # read for one use, never held (`ExpertBuffer.stream`)
    loaded: asyncio.Future[ExpertWeights] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass(frozen=True)
class LayerPins:
    """The experts of one layer pinned at once (for a decode step's layer job)."""

    layer: int
    weights: dict[int, ExpertWeights]  # expert index -> weights
    entries: dict[int, Entry]  # what to unpin (an entry evicted meanwhile is not: pinned, it cannot be)


@dataclass
class BufferCounters:
    hits: int = 0  # acquisitions served from memory (resident or already loading)
    misses: int = 0  # acquisitions that started a load
    loads: int = 0  # loads completed
    evictions: int = 0  # experts dropped to make room
    prefetches: int = 0  # loads started by a prefetch
    fills: int = 0  # loads started by a fill
    fill_preemptions: int = 0  # fill reads stopped part-way for a more urgent read
    placements: int = 0  # loads started for the placement
    fetches: int = 0  # of them, got from a peer's memory instead of the disk
    fetch_failures: int = 0  # fetches that failed (read from the disk instead)
    streamed: int = 0  # slices read for one use, with no room to hold them but a whole expert's


def evictable(entries: Mapping[Key, Entry], placed: Set[ExpertId] = frozenset()) -> Iterator[Key]:
    """The entries nobody uses, read in full and not placed: those eviction may take."""
    return (k for k, v in entries.items() if v.pins == 0 and v.weights is not None and k not in placed)


def choose_victim(entries: Mapping[Key, Entry], policy: EvictionPolicy[Key], placed: Set[ExpertId],
                  protected: Set[ExpertId], allow_protected: bool, evict_whole: bool = True,
                  elsewhere: Set[ExpertId] = frozenset()) -> Key | None:
    """The entry to evict for a new read, or None: the policy's choice among the evictable ones,
    slices first, then whole experts (unless not `evict_whole`), those another agent also holds
    (`elsewhere`) before those held only here, and those the current plan needs (`protected`)
    only if `allow_protected` and no other is left."""
    free = set(evictable(entries, placed))
    # Slices go before whole experts: a whole expert is in the routing table homes read (one
    # gone sends them to a holder that must read all of it again), a slice is 1/N of a read.
    slices: set[Key] = {k for k in free if isinstance(k, SliceId)}
    free = slices or (free if evict_whole else set())
    for allowed in (free - protected, free if allow_protected else set()):
        # A second copy goes before the pool's only one: dropping it costs a round trip to the
        # other holder where it is next needed here, dropping the only copy a read from disk
        # (the routing table is a hint: a copy it names may be gone, and is read again then).
        order = list(policy.victims(allowed))
        victim = next((k for k in order if k in elsewhere), order[0] if order else None)
        if victim is not None:
            return victim
    return None


def slices_to_free(entries: Mapping[Key, Entry], policy: EvictionPolicy[Key], placed: Set[ExpertId],
                   budget: int) -> list[Key] | None:
    """The unused slices to evict, the policy's choice first, so that the entries take at most
    `budget` bytes; None if evicting every one of them would not do."""
    used = sum(e.nbytes for e in entries.values())
    slices = {k for k in evictable(entries, placed) if isinstance(k, SliceId)}
    if used - sum(entries[k].nbytes for k in slices) > budget:
        return None
    out: list[Key] = []
    for key in policy.victims(slices):
        if used <= budget:
            break
        out.append(key)
        used -= entries[key].nbytes
    return out


def unstarted_fill(entries: Mapping[Key, Entry]) -> Key | None:
    """A fill whose read has not begun and that nobody waits for: its reservation may go to a
    load that needs the room."""
    return next((k for k, v in entries.items() if v.priority == FILL and not v.started and not v.pins), None)
