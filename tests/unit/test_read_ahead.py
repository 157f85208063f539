"""Slices read ahead on a home's guess (node_agent/read_ahead.py): held where there is room
without evicting a whole expert, else streamed and kept for the ask; at most MAX_AHEAD kept."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path

import torch

from node_agent.expert_buffer import ExpertBuffer, Key
from node_agent.expert_store import ExpertStore
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import ExpertWeights
from node_agent.read_ahead import MAX_AHEAD, ReadAhead
from node_agent.throttle import Throttle
from protos.ids import ExpertId, SliceId


def setup(model: Path, experts_room: int, disk: ThreadPoolExecutor | None = None) -> tuple[ExpertStore, ExpertBuffer]:
    cfg = MoeConfig.load(model)
    store = ExpertStore(Checkpoint(model), cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(experts_room * store.expert_nbytes, store.expert_nbytes, store.load,
                          disk or ThreadPoolExecutor(1), intermediate=cfg.expert_size)
    return store, buffer


async def test_a_slice_read_ahead_with_room_is_held(qwen_tiny: Path) -> None:
    store, buffer = setup(qwen_tiny, 2)
    ahead, piece = ReadAhead(buffer), SliceId(ExpertId(0, 3), 1, 2)
    await ahead.start(piece)
    async with buffer.pinned(piece) as w:  # the read begun ahead, not a second one
        assert store.bytes_read == store.expert_nbytes // 2
        assert torch.equal(w.gate, store.load(piece).gate)
    assert buffer.resident_slices() == [piece]
    assert ahead.take(piece) is None and (ahead.started, ahead.used) == (1, 1)
    await ahead.start(piece)  # held: nothing more to read
    async with buffer.pinned(ExpertId(0, 5)):
        pass
    await ahead.start(SliceId(ExpertId(0, 5), 0, 2))  # its whole expert is in memory
    assert ahead.started == 1


async def test_a_slice_read_ahead_in_a_full_memory_is_streamed_and_evicts_nothing(qwen_tiny: Path) -> None:
    store, buffer = setup(qwen_tiny, 2)
    for e in (1, 2):  # full of whole experts
        async with buffer.pinned(ExpertId(0, e)):
            pass
    ahead, piece = ReadAhead(buffer), SliceId(ExpertId(0, 3), 0, 2)
    await ahead.start(piece)
    started = ahead.take(piece)
    assert started is not None and ahead.take(piece) is None  # given once
    got = await buffer.stream(piece, started)
    assert store.bytes_read == 2 * store.expert_nbytes + store.expert_nbytes // 2  # the slice read once
    assert torch.equal(got.down, store.load(piece).down)
    assert buffer.all_resident() == [ExpertId(0, 1), ExpertId(0, 2)] and buffer.counters.evictions == 0


async def test_at_most_max_ahead_are_kept_and_the_oldest_unread_one_is_dropped(qwen_tiny: Path) -> None:
    disk, gate = ThreadPoolExecutor(1), threading.Event()
    store, buffer = setup(qwen_tiny, 1, disk)
    async with buffer.pinned(ExpertId(0, 0)):
        pass
    held = disk.submit(gate.wait)  # the disk is busy: no read-ahead begins yet
    ahead = ReadAhead(buffer)
    pieces = [SliceId(ExpertId(layer, e), 0, 2) for layer in (0, 1) for e in range(1, 6)][:MAX_AHEAD + 1]
    for piece in pieces:
        await ahead.start(piece)
    assert ahead.take(pieces[0]) is None  # the oldest, given up
    gate.set()
    await asyncio.wrap_future(held)
    kept = [ahead.take(p) for p in pieces[1:]]
    assert all(k is not None for k in kept)
    await asyncio.gather(*(buffer.stream(p, k) for p, k in zip(pieces[1:], kept)))
    assert store.bytes_read == store.expert_nbytes + MAX_AHEAD * (store.expert_nbytes // 2)  # not the dropped one


async def test_a_layer_asked_without_a_guessed_slice_gives_its_read_up(qwen_tiny: Path) -> None:
    """A home asks an agent for slice 0 of 2 of layer 1's experts 3 and 5; its guess had been 3
    and 4 (and 6 of layer 0, and 4's other half): the read of 4's slice, begun, stops at its next
    chunk, and the rest are kept and read."""
    cfg = MoeConfig.load(qwen_tiny)
    store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
    right, wrong = SliceId(ExpertId(1, 3), 0, 2), SliceId(ExpertId(1, 4), 0, 2)
    other_layer, other_share = SliceId(ExpertId(0, 6), 0, 2), SliceId(ExpertId(1, 4), 1, 2)
    begun, go_on = threading.Event(), threading.Event()

    def load(key: Key, check: Callable[[], None]) -> ExpertWeights:
        if key == wrong:  # its read has begun; the check comes before its next chunk
            begun.set()
            go_on.wait()
            check()
        return store.load(key, check)

    buffer = ExpertBuffer(store.expert_nbytes, store.expert_nbytes, load, ThreadPoolExecutor(1),
                          intermediate=cfg.expert_size)
    async with buffer.pinned(ExpertId(0, 0)):  # full: the guesses are streamed
        pass
    ahead = ReadAhead(buffer)
    for piece in (wrong, right, other_layer, other_share):
        await ahead.start(piece)
    await asyncio.to_thread(begun.wait)
    ahead.drop_unasked([right, SliceId(ExpertId(1, 5), 0, 2)])
    go_on.set()
    assert ahead.dropped == 1 and ahead.take(wrong) is None
    kept = {p: ahead.take(p) for p in (right, other_layer, other_share)}
    got = await asyncio.gather(*(buffer.stream(p, k) for p, k in kept.items()))  # type: ignore[arg-type]
    assert store.bytes_read == store.expert_nbytes + 3 * (store.expert_nbytes // 2)  # not the given-up slice
    assert torch.equal(got[0].gate, store.load(right).gate)
