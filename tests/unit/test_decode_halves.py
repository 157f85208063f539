"""A big decode step's two halves (`decode_batch.halves`): whole spans, the cut nearest half the
rows, else one long span cut inside at half the rows; rows and positions carried over, and no
split for few rows."""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from node_agent import decode_batch
from node_agent.decode_batch import DecodeBatch, halves
from node_agent.decode_run import Run
from protos.ids import RequestId
from protos.messages import DecodeSpan


def batch_of(lengths: list[int]) -> DecodeBatch:
    """A batch of spans of these lengths, span i at position 10 * i, tokens numbered by row."""
    spans, starts, row = [], [], 0
    for i, n in enumerate(lengths):
        spans.append(DecodeSpan(request_id=RequestId(f"r{i}"), token_ids=tuple(range(row, row + n)), position=10 * i))
        starts.append(row)
        row += n
    caches: tuple[Any, ...] = tuple(f"cache{i}" for i in range(len(lengths)))  # `halves` only carries them
    return DecodeBatch(tuple(spans), torch.arange(row), torch.cat([torch.arange(s.position, s.end) for s in spans]),
                       caches, tuple(starts))


def test_the_cut_falls_between_spans_nearest_half_the_rows() -> None:
    batch = batch_of([128, 128, 128, 128])
    parts = halves(batch)
    assert parts is not None
    first, second = parts
    assert [s.request_id for s in first.spans] == ["r0", "r1"] and [s.request_id for s in second.spans] == ["r2", "r3"]
    assert (first.offset, second.offset) == (0, 256)
    assert first.starts == (0, 128) and second.starts == (0, 128)
    assert torch.equal(torch.cat([first.token_ids, second.token_ids]), batch.token_ids)
    assert torch.equal(torch.cat([first.positions, second.positions]), batch.positions)
    assert second.caches == ("cache2", "cache3")
    parts = halves(batch_of([300, 100, 100]))  # 300 | 200 is nearer half than 400 | 100
    assert parts is not None and [len(p.token_ids) for p in parts] == [300, 200]


def test_a_part_of_a_part_keeps_its_row_in_the_step() -> None:
    batch = batch_of([64, 64, 64, 64])
    inner = batch.part(1, 4).part(1, 3)
    assert inner.offset == 128 and [s.request_id for s in inner.spans] == ["r2", "r3"]
    assert torch.equal(inner.token_ids, batch.token_ids[128:256])


def test_no_halves_for_few_rows(monkeypatch: Any) -> None:
    assert decode_batch.PIPELINE_ROWS == 256
    assert halves(batch_of([100, 100])) is None  # fewer rows than PIPELINE_ROWS
    assert halves(batch_of([255])) is None
    assert halves(batch_of([128, 128])) is not None
    monkeypatch.setattr(decode_batch, "PIPELINE_ROWS", 8)
    assert halves(batch_of([4, 4])) is not None


def test_one_long_prompt_is_cut_inside_at_half_its_rows() -> None:
    batch = batch_of([512])
    parts = halves(batch)
    assert parts is not None
    first, second = parts
    assert [(s.request_id, s.position, len(s.token_ids)) for s in first.spans] == [("r0", 0, 256)]
    assert [(s.request_id, s.position, len(s.token_ids)) for s in second.spans] == [("r0", 256, 256)]
    assert first.caches == second.caches == ("cache0",)  # one request, one cache
    assert (first.cut_after, first.cut_before, second.cut_after, second.cut_before) == (True, False, False, True)
    assert (first.offset, second.offset) == (0, 256) and first.starts == second.starts == (0,)
    assert torch.equal(torch.cat([first.positions, second.positions]), batch.positions)
    assert torch.equal(torch.cat([first.token_ids, second.token_ids]), batch.token_ids)
    assert first.ended == 0 and first.last_rows.tolist() == []  # the cut row is no span's end
    assert second.ended == 1 and second.last_rows.tolist() == [255]


def test_without_a_fair_cut_between_spans_the_long_one_is_cut() -> None:
    parts = halves(batch_of([400, 1, 1, 1]))  # between spans the best leaves 3 rows on one side
    assert parts is not None
    first, second = parts
    assert [len(s.token_ids) for s in first.spans] == [201] and first.cut_after
    assert [(s.request_id, len(s.token_ids)) for s in second.spans] == [("r0", 199), ("r1", 1), ("r2", 1), ("r3", 1)]
    assert second.cut_before and second.starts == (0, 199, 200, 201) and second.caches == ("cache0", "cache1", "cache2", "cache3")
    assert second.last_rows.tolist() == [198, 199, 200, 201]
    parts = halves(batch_of([1] * 8 + [400]))
    assert parts is not None
    first, second = parts
    assert first.ended == 8 and first.last_rows.tolist() == list(range(8)) and len(first.token_ids) == 204
    assert second.spans[0].position == 80 + 196 and second.ended == 1


def test_a_cut_on_a_span_start_is_a_cut_between_spans() -> None:
    first, second = batch_of([100, 100, 100]).cut(100)
    assert not (first.cut_after or second.cut_before)
    assert [s.request_id for s in first.spans] == ["r0"] and [s.request_id for s in second.spans] == ["r1", "r2"]


async def test_a_piece_waits_until_the_one_before_is_past_its_layer() -> None:
    first = Run(batch_of([8]), torch.zeros(8, 1, 4), torch.zeros(8, 1, 4), layer=2)
    waiting = asyncio.ensure_future(first.past(3))
    await asyncio.sleep(0)
    first.layer = 3
    first.moved()  # at layer 3, not past it
    await asyncio.sleep(0)
    assert not waiting.done()
    first.layer = 5  # a job ran layers 3 and 4
    first.moved()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(first.past(4), 1)  # already past: no wait
    last = asyncio.ensure_future(first.past(7))
    await asyncio.sleep(0)
    first.logits = torch.zeros(0, 4)  # the piece is through (it has no logits rows)
    first.moved()
    await asyncio.wait_for(last, 1)
