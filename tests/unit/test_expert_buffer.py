"""The expert buffer on real experts read from a generated checkpoint."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from node_agent.cache_policy import LayerCyclicPolicy, LRUPolicy
from node_agent.expert_buffer import BufferTooSmall, ExpertBuffer, ReadPreempted
from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import ExpertWeights
from node_agent.throttle import Throttle
from scheduler.types import ExpertId


def make(model_dir: Path, experts: int) -> tuple[ExpertBuffer, ExpertStore, MoeConfig]:
    cfg = MoeConfig.load(model_dir)
    store = ExpertStore(Checkpoint(model_dir), cfg, torch.float32, Throttle(0))
    return ExpertBuffer(experts * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1)), store, cfg


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Let the event loop (and the disk thread) run until `condition` holds. The timeout only
    keeps a broken buffer from hanging the suite; no test depends on how soon it holds."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


class HeldDisk:
    """The store's reads, in the disk thread, with the first read of one expert held before one
    of its chunks until the test lets it go on: the test acts while that read is under way,
    rather than sleeping and hoping the read has got that far. Records how each read ended."""

    def __init__(self, store: ExpertStore, eid: ExpertId, before_chunk: int) -> None:
        self.store, self.eid, self.before_chunk = store, eid, before_chunk  # before_chunk: 1 = the first
        self.held = threading.Event()  # the read has got there
        self.go_on = threading.Event()
        self.ended: list[tuple[str, ExpertId]] = []  # ("read" | "stopped", expert), in order

    def load(self, eid: ExpertId, check: Callable[[], None]) -> ExpertWeights:
        chunks = 0

        def held_check() -> None:
            nonlocal chunks
            chunks += 1
            if eid == self.eid and chunks == self.before_chunk and not self.held.is_set():
                self.held.set()
                self.go_on.wait(10)
            check()

        try:
            weights = self.store.load(eid, held_check)
        except ReadPreempted:
            self.ended.append(("stopped", eid))
            raise
        self.ended.append(("read", eid))
        return weights

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.held.wait, 10), f"the read of {self.eid} never got there"


def make_held(model_dir: Path, experts: int, eid: ExpertId, before_chunk: int) -> tuple[ExpertBuffer, ExpertStore, HeldDisk]:
    _, store, _ = make(model_dir, experts)
    disk = HeldDisk(store, eid, before_chunk)
    return ExpertBuffer(experts * store.expert_nbytes, store.expert_nbytes, disk.load, ThreadPoolExecutor(1)), store, disk


@pytest.mark.parametrize("capacity", [1, 2, 5])
async def test_budget_never_exceeded_and_counters_add_up(qwen_tiny: Path, capacity: int) -> None:
    buffer, store, cfg = make(qwen_tiny, capacity)
    rng = random.Random(capacity)
    keys = [ExpertId(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)]
    peak = 0
    acquisitions = 0

    async def user(n: int) -> None:
        nonlocal peak, acquisitions
        for _ in range(n):
            eid = rng.choice(keys)
            async with buffer.pinned(eid) as w:
                acquisitions += 1
                peak = max(peak, buffer.bytes_used)
                expected = store.ckpt.read(cfg.expert_tensor_names(eid.layer, eid.index)[0])
                assert torch.equal(w.gate, expected)  # the right expert came back
                await asyncio.sleep(0)

    # Concurrent users, each pinning one expert at a time: never more than the budget.
    await asyncio.gather(*(user(40) for _ in range(3)))
    c = buffer.counters
    assert peak <= buffer.capacity
    assert c.hits + c.misses == acquisitions
    assert c.loads == c.misses  # every miss started exactly one load
    assert c.loads - c.evictions == len(buffer.all_resident())
    assert store.bytes_read == c.loads * store.expert_nbytes
    assert buffer.bytes_used == len(buffer.all_resident()) * buffer.expert_nbytes <= buffer.capacity


async def test_lru_evicts_least_recently_used_and_pins_are_kept(qwen_tiny: Path) -> None:
    buffer, _, _ = make(qwen_tiny, 2)
    a, b, c = ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)
    for eid in (a, b):
        async with buffer.pinned(eid):
            pass
    async with buffer.pinned(a):  # a is now most recent
        pass
    async with buffer.pinned(c):  # evicts b
        pass
    assert buffer.all_resident() == [a, c]
    async with buffer.pinned(a), buffer.pinned(c):
        load = asyncio.create_task(buffer.acquire(b))  # both pinned: must wait
        await until(lambda: buffer.waiting_for_room == 1)
        assert not load.done() and b not in buffer.all_loading() and buffer.bytes_used <= buffer.capacity
    await load
    await buffer.release(b)
    assert b in buffer.all_resident() and len(buffer.all_resident()) == 2


async def test_a_copy_another_agent_holds_goes_before_the_pools_only_one(qwen_tiny: Path) -> None:
    # The routing table names b on another agent too: a read that needs room drops b, though a
    # is the least recently used (dropping a would leave it on no agent, to be read again).
    buffer, _, _ = make(qwen_tiny, 3)
    a, b, c, d, e = (ExpertId(0, i) for i in range(5))
    for eid in (a, b, c):
        async with buffer.pinned(eid):
            pass
    buffer.elsewhere = frozenset({b, e})
    async with buffer.pinned(d):
        pass
    assert buffer.all_resident() == [a, c, d]
    # No copy elsewhere left to drop: the policy's own choice again (a, the least recently used).
    async with buffer.pinned(b):
        pass
    assert buffer.all_resident() == [b, c, d]
    # A pinned copy held elsewhere stays: the next one the policy would drop goes.
    buffer.elsewhere = frozenset({b, c})
    async with buffer.pinned(b), buffer.pinned(c):
        async with buffer.pinned(a):
            pass
    assert buffer.all_resident() == [a, b, c]


async def test_concurrent_requests_for_one_expert_load_it_once(qwen_tiny: Path) -> None:
    buffer, store, _ = make(qwen_tiny, 4)
    eid = ExpertId(1, 3)
    results = await asyncio.gather(*(buffer.acquire(eid) for _ in range(5)))
    assert all(r is results[0] for r in results)
    assert buffer.counters.loads == 1 and buffer.counters.misses == 1 and buffer.counters.hits == 4
    assert store.bytes_read == store.expert_nbytes


async def test_acquires_that_wait_for_room_share_one_load_and_count_one_miss(qwen_tiny: Path) -> None:
    # Two users ask for b while a pins the only slot: both wait for room, the first to get it
    # starts the load and the second joins it (a hit, as joining any load in flight is).
    buffer, _, _ = make(qwen_tiny, 1)
    a, b = ExpertId(0, 0), ExpertId(0, 1)
    await buffer.acquire(a)
    waiters = [asyncio.ensure_future(buffer.acquire(b)) for _ in range(2)]
    await until(lambda: buffer.waiting_for_room == 2)  # both wait for the room a holds
    assert not any(w.done() for w in waiters) and buffer.all_loading() == []
    await buffer.release(a)
    # The second waiter must join the first one's read, not go on waiting for room that the
    # first one's pin on b holds (nor evict b, once unpinned, to read it again).
    first, second = await asyncio.wait_for(asyncio.gather(*waiters), timeout=10)
    assert first is second
    c = buffer.counters
    assert (c.misses, c.loads, c.hits, c.evictions) == (2, 2, 1, 1)


async def test_a_failed_read_unpins_only_its_own_waiters(qwen_tiny: Path) -> None:
    # The first read of e fails; another user asks for e again before the first user has heard
    # of the failure, so a second read (which succeeds) has begun. The first user's unpinning
    # must not take the second user's pin: e stays pinned, so f cannot evict it.
    _, store, _ = make(qwen_tiny, 1)
    e, f = ExpertId(0, 0), ExpertId(0, 1)
    reads = []

    def failing_once(eid: ExpertId, check: Callable[[], None]) -> ExpertWeights:
        reads.append(eid)
        if len(reads) == 1:
            raise OSError("disk read failed")
        return store.load(eid, check)

    buffer = ExpertBuffer(store.expert_nbytes, store.expert_nbytes, failing_once, ThreadPoolExecutor(1))  # one slot
    first = asyncio.ensure_future(buffer.acquire(e))

    async def ask_again_once_dropped() -> ExpertWeights:
        while e not in buffer.all_loading():  # the first read is queued
            await asyncio.sleep(0)
        while e in buffer.all_loading():  # it failed and e was dropped: ask at once
            await asyncio.sleep(0)
        return await buffer.acquire(e)

    second = asyncio.ensure_future(ask_again_once_dropped())
    with pytest.raises(OSError, match="disk read failed"):
        await asyncio.wait_for(first, timeout=10)
    await asyncio.wait_for(second, timeout=10)
    evicting = asyncio.ensure_future(buffer.acquire(f))
    await until(lambda: buffer.waiting_for_room == 1)  # e is still pinned by the second user
    assert not evicting.done()
    assert buffer.all_resident() == [e]
    await buffer.release(e)
    await asyncio.wait_for(evicting, timeout=10)
    assert buffer.all_resident() == [f] and reads == [e, e, f]


async def test_fill_takes_only_free_memory_and_gives_it_back_to_a_load(qwen_tiny: Path) -> None:
    a, b, c = ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2)
    buffer, store, disk = make_held(qwen_tiny, 2, a, before_chunk=1)
    assert buffer.fill(a) and buffer.fill(b)
    assert not buffer.fill(c)  # no free room: a fill never evicts
    await disk.wait_held()  # a is being read, b waits in the queue
    loading = asyncio.ensure_future(buffer.acquire(c))  # needs room: b's reservation goes, not a resident expert
    await until(lambda: c in buffer.all_loading())
    assert buffer.all_loading() == [a, c]
    disk.go_on.set()
    weights = await asyncio.wait_for(loading, timeout=10)
    await buffer.release(c)
    assert torch.equal(weights.gate, store.ckpt.read(store.cfg.expert_tensor_names(0, 2)[0]))
    await until(lambda: not buffer.loading(0))
    assert buffer.all_resident() == [a, c]
    assert buffer.counters.evictions == 0 and buffer.counters.fills == 2 and buffer.counters.loads == 2
    assert buffer.bytes_used <= buffer.capacity


async def test_a_prefetch_fill_keeps_its_room_and_give_up_spares_what_is_kept(qwen_tiny: Path) -> None:
    """The decode prefetch's fill (`prefetch`): its reservation is not given back to a load that
    needs room, as a plain fill's is. `give_up` drops a resident cache entry, never a placed one,
    one in use, one the current plan needs, or one still being read."""
    x, a, b, c, d = ExpertId(1, 0), ExpertId(0, 0), ExpertId(0, 1), ExpertId(0, 2), ExpertId(0, 3)
    buffer, store, disk = make_held(qwen_tiny, 3, x, before_chunk=1)
    reading = asyncio.ensure_future(buffer.acquire(x))  # a demand read, held: the disk is busy
    await disk.wait_held()
    assert buffer.fill(a) and buffer.fill(b, prefetch=True)  # both queued behind it
    assert not await buffer.give_up(b)  # not read yet
    loading = asyncio.ensure_future(buffer.acquire(c))  # needs room: the plain fill's is given back
    await until(lambda: c in buffer.all_loading())
    assert buffer.all_loading() == [b, c, x]
    waiting = asyncio.ensure_future(buffer.acquire(d))  # no fill left to give back: the prefetch keeps its room
    await until(lambda: buffer.waiting_for_room == 1)
    assert buffer.all_loading() == [b, c, x]
    disk.go_on.set()
    await asyncio.wait_for(reading, timeout=10)
    await buffer.release(x)  # d takes x's room
    await asyncio.wait_for(asyncio.gather(loading, waiting), timeout=10)
    await buffer.release(c)
    await buffer.release(d)
    await until(lambda: not buffer.loading(0))
    assert buffer.all_resident() == [b, c, d]
    assert buffer.counters.prefetches == 1 and buffer.counters.fills == 1  # (a's read never began)
    buffer.protect([b])
    assert not await buffer.give_up(b)  # the plan needs it
    buffer.protect([])
    buffer.place([c])
    assert not await buffer.give_up(c)  # placed
    async with buffer.pinned(b):
        assert not await buffer.give_up(b)  # in use
    evictions = buffer.counters.evictions
    assert await buffer.give_up(b) and buffer.all_resident() == [c, d]
    assert buffer.counters.evictions == evictions + 1 and not await buffer.give_up(a)  # not held
    assert buffer.bytes_used <= buffer.capacity


async def test_fill_read_yields_the_disk_to_a_demand_read(qwen_tiny: Path) -> None:
    """A fill being read stops at its next chunk when a demand read is queued, and is read again
    after it; a fill that someone then needs is no longer stopped."""
    a, b = ExpertId(1, 0), ExpertId(1, 1)
    buffer, store, disk = make_held(qwen_tiny, 4, a, before_chunk=2)
    assert buffer.fill(a)
    await disk.wait_held()  # a's first tensor is read, its second is next
    done: list[ExpertId] = []

    async def need(eid: ExpertId) -> None:
        async with buffer.pinned(eid):
            done.append(eid)

    needed = asyncio.ensure_future(need(b))
    await until(lambda: b in buffer.all_loading())  # queued behind a's read
    disk.go_on.set()
    await asyncio.wait_for(needed, timeout=10)
    assert done == [b] and disk.ended[:2] == [("stopped", a), ("read", b)]  # b came first
    assert buffer.counters.fill_preemptions == 1
    await need(a)  # now needed: joins the read (or finds it done), which no longer yields
    assert done == [b, a] and buffer.all_resident() == [a, b]
    assert disk.ended == [("stopped", a), ("read", b), ("read", a)]  # a is read again from the start
    assert store.bytes_read > 2 * store.expert_nbytes  # the stopped part of a's first read was paid for
    assert buffer.counters.loads == 2 and buffer.counters.misses == 1 and buffer.counters.hits == 1


def test_budget_smaller_than_one_expert_is_refused() -> None:
    with pytest.raises(BufferTooSmall, match="cannot hold one expert"):
        ExpertBuffer(100, 1000, lambda e: None, ThreadPoolExecutor(1))  # type: ignore[arg-type,return-value]


def test_lru_policy_orders_victims() -> None:
    p: LRUPolicy[int] = LRUPolicy()
    for k in (1, 2, 3):
        p.on_insert(k)
    p.on_access(1)
    assert list(p.victims({1, 2, 3})) == [2, 3, 1]
    p.on_remove(2)
    assert list(p.victims({1, 3})) == [3, 1]


def test_layer_cyclic_policy_evicts_the_layer_needed_last() -> None:
    p = LayerCyclicPolicy(4)
    keys = [ExpertId(layer, 0) for layer in range(4)]
    for k in keys:
        p.on_insert(k)
    p.on_access(ExpertId(1, 0))  # working on layer 1: layer 2 is next, layer 1 comes round last
    assert list(p.victims(set(keys))) == [ExpertId(1, 0), ExpertId(0, 0), ExpertId(3, 0), ExpertId(2, 0)]


def test_layer_cyclic_prefetched_layer_is_not_the_next_victim() -> None:
    """Working on layer 1, experts of layer 2 arrive by prefetch: layer 2 is still needed next,
    so its experts (resident before or just read) go last, and the layer just used goes first."""
    p = LayerCyclicPolicy(4)
    resident = [ExpertId(layer, 0) for layer in range(4)]
    for k in resident:
        p.on_insert(k)
    p.on_access(ExpertId(1, 0))
    p.on_insert(ExpertId(2, 1), ahead=True)  # a prefetch completes
    assert list(p.victims({*resident, ExpertId(2, 1)}))[-2:] == [ExpertId(2, 0), ExpertId(2, 1)]
    assert next(iter(p.victims(set(resident)))) == ExpertId(1, 0)


async def test_layer_cyclic_keeps_a_share_of_every_pass_where_lru_keeps_none(qwen_tiny: Path) -> None:
    """Reading all layers' experts in order, pass after pass, with room for a third of them:
    LRU misses every time, the cyclic policy keeps what it can."""
    cfg = MoeConfig.load(qwen_tiny)
    hits = {}
    for name, policy in (("lru", LRUPolicy[ExpertId]()), ("cyclic", LayerCyclicPolicy(cfg.num_layers))):
        store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
        capacity = cfg.num_layers * cfg.num_experts // 3
        buffer = ExpertBuffer(capacity * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1), policy)
        for _ in range(3):
            for layer in range(cfg.num_layers):
                for e in range(cfg.num_experts):
                    async with buffer.pinned(ExpertId(layer, e)):
                        pass
        hits[name] = buffer.counters.hits
    assert hits["lru"] == 0
    assert hits["cyclic"] >= 2 * (cfg.num_layers * cfg.num_experts // 3) - cfg.num_experts


async def test_placed_experts_are_read_and_never_evicted(qwen_tiny: Path) -> None:
    buffer, store, cfg = make(qwen_tiny, 4)
    placed = {ExpertId(0, 0), ExpertId(0, 1), ExpertId(1, 2)}
    buffer.place(placed)
    await until(lambda: placed <= set(buffer.all_resident()))
    assert buffer.counters.placements == 3
    others = [ExpertId(layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts)
              if ExpertId(layer, e) not in placed]
    for eid in others[:10]:  # demand reads take turns in the one slot left to the cache
        async with buffer.pinned(eid) as weights:
            assert torch.equal(weights.gate, store.load(eid, lambda: None).gate)
        assert placed <= set(buffer.all_resident()) and buffer.bytes_used <= buffer.capacity


async def test_a_new_placement_replaces_the_old_whose_experts_stay_as_cache(qwen_tiny: Path) -> None:
    buffer, _, _ = make(qwen_tiny, 5)
    first, second = {ExpertId(0, e) for e in range(4)}, {ExpertId(1, e) for e in range(2)}
    buffer.place(first)
    await until(lambda: first <= set(buffer.all_resident()))
    buffer.place(second)
    await until(lambda: second <= set(buffer.all_resident()))
    resident = set(buffer.all_resident())
    assert len(resident) == 5 and len(resident & first) == 3  # the free slot and one old expert made room
    assert buffer.counters.placements == 6 and buffer.counters.evictions == 1


async def test_a_placement_that_leaves_no_slot_to_the_cache_is_refused(qwen_tiny: Path) -> None:
    buffer, _, _ = make(qwen_tiny, 3)
    with pytest.raises(ValueError, match="does not fit"):
        buffer.place({ExpertId(0, e) for e in range(3)})
    buffer.place({ExpertId(0, e) for e in range(2)})  # one slot stays a cache


async def test_a_placed_expert_whose_read_fails_does_not_stop_the_others(qwen_tiny: Path) -> None:
    _, store, _ = make(qwen_tiny, 4)
    broken = ExpertId(0, 1)

    def load(eid: ExpertId, check: Callable[[], None]) -> ExpertWeights:
        if eid == broken:
            raise OSError("bad sector")
        return store.load(eid, check)

    buffer = ExpertBuffer(4 * store.expert_nbytes, store.expert_nbytes, load, ThreadPoolExecutor(1))
    buffer.place({ExpertId(0, 0), broken, ExpertId(0, 2)})
    await until(lambda: {ExpertId(0, 0), ExpertId(0, 2)} <= set(buffer.all_resident()))
    assert broken not in buffer.all_resident() and buffer.counters.placements == 3
