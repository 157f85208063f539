"""Expert slices (expert tensor parallelism): a slice's units, its math, reading only its bytes,
and holding slices in the expert buffer under its byte budget (real generated checkpoints)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from node_agent.expert_buffer import ExpertBuffer
from node_agent.expert_store import ExpertStore
from node_agent.model import checkpoint as checkpoint_module
from node_agent.model.checkpoint import Checkpoint
from node_agent.model.config import MoeConfig
from node_agent.model.moe import ExpertWeights, swiglu
from node_agent.throttle import Throttle
from protos.ids import ExpertId, SliceId
from tests.conftest import ARCHS


@pytest.mark.parametrize("units", [768, 7, 5])
def test_the_slices_of_an_expert_cover_its_units_once(units: int) -> None:
    for of in range(2, 6):
        spans = [SliceId(ExpertId(0, 0), part, of).units(units) for part in range(of)]
        assert spans[0][0] == 0 and spans[-1][1] == units
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap
        assert all(stop > start for start, stop in spans)  # none empty while of <= units


def test_a_slice_outside_its_expert_is_refused() -> None:
    for part, of in ((2, 2), (-1, 3), (0, 1), (0, 0)):
        with pytest.raises(ValueError, match="slice"):
            SliceId(ExpertId(0, 0), part, of)


def test_the_slices_outputs_add_up_to_the_expert() -> None:
    torch.manual_seed(0)
    D, units = 16, 24
    expert = ExpertWeights(torch.randn(units, D), torch.randn(units, D), torch.randn(D, units))
    x = torch.randn(5, D)
    for of in (2, 3, 4):
        parts = [swiglu(expert.units(*SliceId(ExpertId(0, 0), p, of).units(units)), x) for p in range(of)]
        assert torch.allclose(sum(parts), swiglu(expert, x), atol=1e-5)


@pytest.mark.parametrize("chunk", [checkpoint_module.READ_CHUNK, 100])
def test_a_block_reads_only_its_bytes_and_equals_the_tensor_s_block(qwen_tiny: Path, chunk: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_module, "READ_CHUNK", chunk)  # small chunks: several per row and across rows
    ckpt, cfg = Checkpoint(qwen_tiny), MoeConfig.load(qwen_tiny)
    gate, _, down = cfg.expert_tensor_names(0, 1)
    whole_gate, whole_down = ckpt.read(gate), ckpt.read(down)
    announced: list[int] = []
    rows = ckpt.read_block(gate, (3, 9), before_chunk=announced.append)
    assert torch.equal(rows, whole_gate[3:9])
    assert sum(announced) == rows.numel() * rows.element_size() and max(announced) <= chunk
    announced.clear()
    cols = ckpt.read_block(down, (0, whole_down.shape[0]), (2, 7), before_chunk=announced.append)
    assert torch.equal(cols, whole_down[:, 2:7])
    assert sum(announced) == cols.numel() * cols.element_size() and max(announced) <= chunk
    with pytest.raises(ValueError, match="outside"):
        ckpt.read_block(gate, (0, whole_gate.shape[0] + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_store_reads_a_slice_s_share_of_the_bytes(tiny_models: dict[str, Path], arch: str) -> None:
    cfg = MoeConfig.load(tiny_models[arch])
    store = ExpertStore(Checkpoint(tiny_models[arch]), cfg, torch.float32, Throttle(0))
    whole = store.load(ExpertId(1, 2))
    read = store.bytes_read
    for part in range(3):
        piece = SliceId(ExpertId(1, 2), part, 3)
        got = store.load(piece)
        want = whole.units(*piece.units(cfg.expert_size))
        assert all(torch.equal(a, b) for a, b in ((got.gate, want.gate), (got.up, want.up), (got.down, want.down)))
    assert store.bytes_read - read == store.expert_nbytes  # three thirds: the expert's bytes once


async def test_the_buffer_holds_slices_under_its_byte_budget(qwen_tiny: Path) -> None:
    cfg = MoeConfig.load(qwen_tiny)
    store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1),
                          intermediate=cfg.expert_size)  # room for one whole expert
    halves = [SliceId(ExpertId(0, e), 0, 2) for e in (1, 2, 3)]
    for half in halves[:2]:
        async with buffer.pinned(half):
            pass
    assert buffer.resident_slices() == halves[:2] and buffer.bytes_used == store.expert_nbytes
    assert buffer.all_resident() == [] and buffer.resident(0) == []  # slices are not whole experts
    async with buffer.pinned(halves[2]):  # no room left: the least recently used half goes
        pass
    assert buffer.resident_slices() == halves[1:] and buffer.counters.evictions == 1
    async with buffer.pinned(ExpertId(0, 4)):  # a whole expert takes both halves' room
        pass
    assert buffer.resident_slices() == [] and buffer.all_resident() == [ExpertId(0, 4)]
    assert buffer.bytes_used == store.expert_nbytes


async def test_a_slice_with_only_whole_experts_to_evict_is_streamed_not_held(qwen_tiny: Path) -> None:
    cfg = MoeConfig.load(qwen_tiny)
    store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(2 * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1),
                          intermediate=cfg.expert_size)
    for e in (1, 2):  # full of whole experts
        async with buffer.pinned(ExpertId(0, e)):
            pass
    piece = SliceId(ExpertId(0, 3), 1, 2)
    assert not buffer.room_for_slice(piece)
    got = await buffer.stream(piece)
    want = store.load(piece)
    assert torch.equal(got.gate, want.gate) and torch.equal(got.down, want.down)
    assert buffer.all_resident() == [ExpertId(0, 1), ExpertId(0, 2)] and buffer.resident_slices() == []
    assert (buffer.counters.evictions, buffer.counters.streamed) == (0, 1)


async def test_a_fill_takes_the_room_of_unused_slices_never_of_a_whole_expert(qwen_tiny: Path) -> None:
    # The scheduler fills an expert no agent holds: worth more here than slices of split runs.
    cfg = MoeConfig.load(qwen_tiny)
    store = ExpertStore(Checkpoint(qwen_tiny), cfg, torch.float32, Throttle(0))
    buffer = ExpertBuffer(2 * store.expert_nbytes, store.expert_nbytes, store.load, ThreadPoolExecutor(1),
                          intermediate=cfg.expert_size)
    async with buffer.pinned(ExpertId(0, 1)):
        pass
    halves = [SliceId(ExpertId(1, e), 0, 2) for e in (2, 3)]
    for half in halves:
        async with buffer.pinned(half):
            pass
    async with buffer.pinned(halves[1]):  # in use: it stays, and half an expert is too little room
        assert not buffer.fill(ExpertId(1, 4))
        assert buffer.resident_slices() == halves and buffer.counters.evictions == 0
    assert buffer.fill(ExpertId(1, 4))
    await buffer.release(await buffer.acquire(ExpertId(1, 4)))  # its read done
    assert buffer.resident_slices() == [] and buffer.all_resident() == [ExpertId(0, 1), ExpertId(1, 4)]
    assert not buffer.fill(ExpertId(1, 5))  # only whole experts left: it never evicts one
    assert buffer.all_resident() == [ExpertId(0, 1), ExpertId(1, 4)]
